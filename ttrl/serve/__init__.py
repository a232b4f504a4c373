"""`ttrl-serve`: answer live queries over an OpenAI-compatible API and learn from them.

    config.py     the serve.* keys (schema + validation)
    server.py     start-up: Ray, serving + staging engines, trainer, store, HTTP, learner
    app.py        the HTTP API (completions, chat, feedback, health, metrics, admin)
    protocol.py   the OpenAI wire format
    engines.py    request batching over the serving engines, hot swaps, recovery
    selection.py  self-consistency: the majority answer's most likely completion
    store.py      SQLite (WAL, synchronous=FULL): queries, votes, feedback, versions, rounds
    learner.py    background TTRL rounds on served queries, on the staging engine
    feedback.py   user ratings as corrections of the majority vote
    gate.py       the safety gate: candidate vs current on a regression set + collapse signals
    versions.py   promoted weights on disk (HF export + DeepSpeed state)
    prom.py       Prometheus text
    auth.py       the admin token
    loadtest.py   `python -m ttrl.serve.loadtest`: a bounded load test of a local server
    testing.py    fake engine actors and tokenizer (the unit tests run the server without Ray)

Importing this package starts nothing and imports no ray, vllm or deepspeed.
"""

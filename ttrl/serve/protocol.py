"""The OpenAI wire format: request bodies in, response bodies out.

`/v1/completions` and `/v1/chat/completions` take what the `openai` client
sends; what the engines cannot do is refused with a 400 naming the
parameter (streaming, echo, log-probs), never silently ignored. Bodies are
read strictly (`parse_body`): NaN, Infinity and lone surrogates, which
Python's JSON parser lets through, and integers longer than any field
takes, are refused with the path of the value;
booleans are not numbers; token ids must be inside the vocabulary. What a
request may cost (prompts, samples, comment length) is capped by
`RequestLimits` (serve.limits.*), over-limit answers are 413. `stop`
strings are applied to the finished text. One extension: `votes` (sent by
the openai client as `extra_body={"votes": 8}`) asks for self-consistency
over that many samples. Responses carry `system_fingerprint: "ttrl-v<N>"`,
the weights version that answered, and a `ttrl` object (version, votes,
agreement, answer) that OpenAI clients ignore. Pure: no engine here.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_N = 16
MAX_VOTES = 64


class RequestError(ValueError):
    """A request the server will not run; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class Defaults:
    temperature: float
    top_p: float
    max_tokens: int
    votes: int
    max_model_len: int
    vocab_size: int | None = None  # token ids must be in [0, vocab_size); None = not checked here


@dataclass(frozen=True)
class RequestLimits:
    """serve.limits.* as the parser applies them (each over-limit answer is a 413 naming its key)."""

    max_prompts: int = 64
    max_samples: int = 256
    max_comment_chars: int = 2000


class _NonFinite:
    """Stands in for NaN/Infinity while parsing, so the refusal can name where it was."""

    def __init__(self, text: str):
        self.text = text

    def what(self) -> str:
        return f"{self.text} is not a number JSON allows"


# No field takes an integer longer than a 64-bit seed (20 characters with its sign); Python's own parser
# refuses over 4300 digits with a ValueError that could only say "not valid JSON", naming no field.
MAX_INT_CHARS = 32


class _LongInt:
    """Stands in for an integer of more than MAX_INT_CHARS characters while parsing."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))

    def what(self) -> str:
        return f"an integer of {self.digits} digits (no field takes more than {MAX_INT_CHARS - 1})"


# Strings and containers `_find_bad` visits before it gives up naming where a bad value is (a request's own
# fields are a few hundred; a body of a million tiny lists would otherwise hold the event loop for a second).
FIND_BAD_BUDGET = 20_000


def _find_bad(value: Any, path: str) -> tuple[str, str] | None:
    """(path, what) of the first non-finite number, over-long integer or lone surrogate in a parsed body;
    None when there is none, or none within FIND_BAD_BUDGET strings and containers.

    Depth first, one child at a time, and a value's path is spelled out only
    once it is found bad: a path built for every element of a body under the
    size limit (one long key over a long list) made gigabytes of strings, and
    a million tiny lists pushed at once held the event loop for a second.
    """
    what = _bad_leaf(value)
    if what is not None:
        return _spell(None, path), what
    if not isinstance(value, (dict, list)):
        return None
    stack: list[tuple[Any, Any]] = [(None, _children(value))]  # (the container's where, its (key, child)s left)
    visits = 0
    while stack:
        at, children = stack[-1]
        for k, x in children:
            if type(x) in _PLAIN:
                continue
            visits += 1
            if visits > FIND_BAD_BUDGET:
                return None
            if isinstance(k, str) and _bad_leaf(k) is not None:
                return _spell(at, path), "a key with a lone surrogate (not valid Unicode text)"
            what = _bad_leaf(x)
            if what is not None:
                return _spell((at, k), path), what
            if isinstance(x, (dict, list)) and x:
                stack.append(((at, k), _children(x)))
                break
        else:
            stack.pop()
    return None


def _children(v: dict | list) -> Any:
    return iter(v.items()) if isinstance(v, dict) else enumerate(v)


def _bad_leaf(v: Any) -> str | None:
    """What is wrong with a value by itself (a parser's stand-in, a string with a lone surrogate), or None."""
    if isinstance(v, _MARKERS):
        return v.what()
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return "a string with a lone surrogate (not valid Unicode text)"
    return None


def _spell(at: Any, root: str) -> str:
    """The path of a `_find_bad` position: `(parent, key or index)` links up to the root."""
    parts = []
    while at is not None:
        at, part = at
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    text = root + "".join(reversed(parts))
    return text.removeprefix(".") or "body"


def _lone_surrogate(body: Any) -> bool:
    """Whether any string of a parsed body (key or value) holds a lone surrogate: one pass of the C encoder
    (a pair, which clients that escape every non-ASCII character send for an emoji, is valid text)."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_MARKERS = (_NonFinite, _LongInt)
_PLAIN = (int, float, bool, type(None))  # what JSON parses to that can hold nothing bad
# A lone surrogate can only come in as an escape (the body is strict UTF-8); an escaped backslash before
# "u" is a false alarm that costs a walk, never a wrong answer.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_body(data: bytes) -> Any:
    """A request body as JSON, strictly: valid UTF-8, finite numbers, no lone surrogates."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("the request body is not valid UTF-8") from None

    marked: list[Any] = []  # what the parser's hooks stood in for a bad value: only then is the body walked

    def mark(x: Any) -> Any:
        marked.append(x)
        return x

    def finite(s: str) -> Any:
        x = float(s)
        return x if math.isfinite(x) else mark(_NonFinite(s))

    try:
        body = json.loads(text, parse_constant=lambda t: mark(_NonFinite(t)), parse_float=finite,
                          parse_int=lambda t: int(t) if len(t) <= MAX_INT_CHARS else mark(_LongInt(t)))
    except (ValueError, RecursionError):
        raise RequestError("the request body is not valid JSON") from None
    bad = None
    if marked or (_SURROGATE_ESCAPE.search(text) and _lone_surrogate(body)):
        # Something is bad: where, if a short walk finds it; else what, for the whole body.
        bad = _find_bad(body, "") or ("body", marked[0].what() if marked else
                                      "a string with a lone surrogate (not valid Unicode text)")
    if bad is not None:
        where, what = bad
        # The path as far as a reader needs it: a 20k-character key is not echoed back whole.
        shown = where if len(where) <= 120 else f"{where[:60]}...{where[-40:]}"
        raise RequestError(f"'{shown}': {what}", where.split(".")[0].split("[")[0][:120])
    return body


@dataclass(frozen=True)
class Sampling:
    n: int  # choices returned (plain sampling)
    votes: int  # samples drawn per prompt for self-consistency (1 = off)
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def engine_key(self) -> tuple:
        """Requests with the same key share one engine call."""
        return (max(self.n, self.votes), self.temperature, self.top_p, -1, self.max_tokens, self.seed)


@dataclass
class ParsedRequest:
    prompts: list[str] = field(default_factory=list)  # text prompts (template applied for chat)
    prompt_ids: list[list[int]] | None = None  # token-id prompts, when the client sent ids
    sampling: Sampling | None = None
    model: str | None = None


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"'{key}' must be a number", key)
    if v < lo or v > hi or (lo_open and v == lo):
        raise RequestError(f"'{key}'={v} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]", key)
    return float(v)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{key}' must be an integer", key)
    if not lo <= v <= hi:
        raise RequestError(f"'{key}'={v} must be between {lo} and {hi}", key)
    return v


def _refuse_unsupported(body: dict) -> None:
    if body.get("stream"):
        raise RequestError("streaming is not supported by this server; send 'stream': false", "stream")
    if body.get("echo"):
        raise RequestError("'echo' is not supported", "echo")
    if body.get("logprobs") not in (None, False, 0):
        raise RequestError("'logprobs' is not supported", "logprobs")
    if body.get("top_logprobs") not in (None, 0):
        raise RequestError("'top_logprobs' is not supported", "top_logprobs")
    best_of = body.get("best_of")
    if best_of not in (None, 1) and best_of != body.get("n", 1):
        raise RequestError("'best_of' is not supported; use 'votes' for self-consistency", "best_of")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise RequestError(f"'{key}' is not supported", key)
    if body.get("tools") or body.get("functions"):
        raise RequestError("tool calls are not supported", "tools")


def parse_sampling(body: dict, d: Defaults) -> Sampling:
    _refuse_unsupported(body)
    temperature = _number(body, "temperature", d.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", d.top_p, 0.0, 1.0, lo_open=True)
    # The newer name wins where both are given; a null one is not given (the openai client sends nulls).
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, d.max_tokens, 1, d.max_model_len - 1)
    n = _integer(body, "n", 1, 1, MAX_N)
    votes = _integer(body, "votes", d.votes, 1, MAX_VOTES)
    if body.get("votes") is None and (n > 1 or temperature == 0):
        # serve.votes is the server's default, not the client's ask: a client asking for n choices or a
        # greedy answer gets plain sampling, not a refusal naming a field it never sent.
        votes = 1
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    if votes > 1 and n > 1:
        raise RequestError("'n' must be 1 when 'votes' > 1 (self-consistency returns the one voted answer)", "n")
    if votes > 1 and temperature == 0:
        raise RequestError("'votes' > 1 needs 'temperature' > 0: greedy samples all agree", "votes")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(s for s in stop if s)
    else:
        raise RequestError("'stop' must be a string or a list of up to 4 strings", "stop")
    return Sampling(n=n, votes=votes, temperature=temperature, top_p=top_p, max_tokens=int(max_tokens),
                    seed=seed, stop=stops)


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def check_cost(n_prompts: int, s: Sampling, limits: RequestLimits) -> None:
    """Refuse (413) a request that asks for more prompts or samples than serve.limits allows."""
    if n_prompts > limits.max_prompts:
        raise RequestError(f"{n_prompts} prompts in one request; serve.limits.max_prompts={limits.max_prompts}",
                           "prompt", status=413, kind="request_too_large")
    samples = n_prompts * max(s.n, s.votes)
    if samples > limits.max_samples:
        raise RequestError(f"{n_prompts} prompt(s) x {max(s.n, s.votes)} samples = {samples} samples in one request; "
                           f"serve.limits.max_samples={limits.max_samples}", "votes" if s.votes > s.n else "n",
                           status=413, kind="request_too_large")


def parse_completion(body: Any, d: Defaults, limits: RequestLimits | None = None) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    req = ParsedRequest(model=body.get("model"), sampling=parse_sampling(body, d))
    if isinstance(prompt, str):
        req.prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        req.prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
        req.prompt_ids = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(_is_id(t) for t in p)
                                                     for p in prompt):
        req.prompt_ids = [list(p) for p in prompt]
    else:
        raise RequestError("'prompt' must be a non-empty string, a list of strings, or token ids (integers)",
                           "prompt")
    n_prompts = len(req.prompts) if req.prompt_ids is None else len(req.prompt_ids)
    check_cost(n_prompts, req.sampling, limits or RequestLimits())
    if req.prompts and any(not p for p in req.prompts):
        raise RequestError("'prompt' must not be empty", "prompt")
    if req.prompt_ids is not None and d.vocab_size is not None:
        bad = next((t for p in req.prompt_ids for t in p if not 0 <= t < d.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {d.vocab_size})", "prompt")
    return req


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise RequestError("only text content parts are supported", "messages")
        return "".join(parts)
    raise RequestError("a message's 'content' must be a string or a list of text parts", "messages")


def parse_chat(body: Any, d: Defaults, limits: RequestLimits | None = None
               ) -> tuple[list[dict[str, str]], Sampling, str | None]:
    """(messages with plain-text content, sampling, model) of a chat request."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError("each message needs a 'role' of system, user or assistant", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": message_text(m.get("content"))})
    if not any(m["role"] == "user" for m in clean):
        raise RequestError("'messages' must contain a user message", "messages")
    sampling = parse_sampling(body, d)
    check_cost(1, sampling, limits or RequestLimits())
    return clean, sampling, body.get("model")


def render_chat(messages: list[dict[str, str]], model_cfg: Any, tokenizer: Any) -> str:
    """The prompt text of a conversation, as the model was trained to read it.

    `model.template=chat`: the tokenizer's chat template (the config's system
    prompt when the conversation has none). `plain`: the last user message
    in `model.prompt_template` (a completion model has no turns).
    """
    from ttrl.data.templates import render_prompt

    if model_cfg.template == "chat":
        msgs = list(messages)
        if model_cfg.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": model_cfg.system_prompt})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    last_user = [m["content"] for m in messages if m["role"] == "user"][-1]
    return render_prompt(last_user, model_cfg, tokenizer)


def apply_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut `text` at the first stop string; whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def fingerprint(version: int) -> str:
    return f"ttrl-v{version}"


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int],
                    version: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
                    for i, c in enumerate(choices)],
        "usage": usage, "system_fingerprint": fingerprint(version), "ttrl": extra,
    }


def chat_body(rid: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int],
              version: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                     "finish_reason": c["finish_reason"], "logprobs": None} for i, c in enumerate(choices)],
        "usage": usage, "system_fingerprint": fingerprint(version), "ttrl": extra,
    }


def finish_reason(engine_reason: str | None, stopped: bool) -> str:
    if stopped:
        return "stop"
    return "length" if engine_reason == "length" else "stop"


def parse_feedback(body: Any, limits: RequestLimits | None = None) -> tuple[str, int, float, str | None]:
    """(response id, choice index, score in [0, 1], comment) of a /v1/feedback body.

    The verdict is one of `score` (0..1), `thumbs` ("up" / "down") or
    `rating` (+1 / -1).
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    rid = body.get("id")
    if not isinstance(rid, str) or not rid:
        raise RequestError("'id' must be the id of a response this server gave", "id")
    index = _integer(body, "index", 0, 0, 10_000)
    given = [k for k in ("score", "thumbs", "rating") if body.get(k) is not None]
    if len(given) != 1:
        raise RequestError("send exactly one of 'score' (0..1), 'thumbs' ('up'/'down') or 'rating' (+1/-1)",
                           given[1] if len(given) > 1 else "score")
    key = given[0]
    if key == "score":
        score = _number(body, "score", 0.0, 0.0, 1.0)
    elif key == "thumbs":
        if body["thumbs"] not in ("up", "down"):
            raise RequestError("'thumbs' must be 'up' or 'down'", "thumbs")
        score = 1.0 if body["thumbs"] == "up" else 0.0
    else:
        if body["rating"] not in (1, -1) or isinstance(body["rating"], bool):
            raise RequestError("'rating' must be 1 or -1", "rating")
        score = 1.0 if body["rating"] == 1 else 0.0
    comment = body.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise RequestError("'comment' must be a string", "comment")
    limit = (limits or RequestLimits()).max_comment_chars
    if comment is not None and len(comment) > limit:
        raise RequestError(f"the comment has {len(comment)} characters; serve.limits.max_comment_chars={limit}",
                           "comment", status=413, kind="request_too_large")
    return rid, int(index), float(score), comment


__all__ = ["Defaults", "ParsedRequest", "RequestError", "RequestLimits", "Sampling", "apply_stop", "chat_body",
           "check_cost", "completion_body", "fingerprint", "finish_reason", "message_text", "new_id", "parse_body",
           "parse_chat", "parse_completion", "parse_feedback", "parse_sampling", "render_chat"]

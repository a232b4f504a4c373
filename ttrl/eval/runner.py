"""Evaluate a policy on labelled problems: pass@1, pass@k and maj@k with standard errors.

`evaluate` takes any `generate` function (the training Runtime's engines,
or a standalone engine in `ttrl-eval`), samples k completions per problem,
extracts and votes over the answers, and grades against the ground truth.
Each answer class is graded once, not each sample. This is metrics code:
its numbers never flow back into training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ttrl.eval.metrics import maj_at_k_exact, mean_and_stderr, pass_at_k
from ttrl.labeling.extract import extract_answer
from ttrl.labeling.grade import is_equivalent
from ttrl.labeling.vote import majority_votes
from ttrl.types import Prompt

# generate(prompt_ids, n, temperature, top_p, top_k, max_tokens) -> [P][n] dicts with "text", "token_ids"
GenerateFn = Callable[..., list[list[dict]]]


def grade_samples(prompts: Sequence[Prompt], texts: Sequence[Sequence[str]],
                  extractor: str = "boxed") -> list[dict[str, Any]]:
    """Per problem: answers (read by `extractor`), each sample's correctness, and the majority vote's verdict.

    Answers are voted on and graded as `extractor` compares them (letters, numbers or math-verify).
    """
    answers = [[extract_answer(t, extractor, prompt=p.id) for t in row] for p, row in zip(prompts, texts)]
    votes = majority_votes(answers, extractor=extractor)
    records = []
    for p, row, vote in zip(prompts, answers, votes):
        if p.answer is None:
            raise ValueError(f"problem {p.id} has no answer to grade against")
        class_ok = [is_equivalent(rep, p.answer, extractor) for rep in vote.counts]
        correct = [cls is not None and class_ok[cls] for cls in vote.assignment]
        records.append({
            "id": p.id, "answer": p.answer, "answers": row, "correct": correct,
            # (class id, correct) per sample, -1 for no answer: what maj@k needs.
            "classes": [(-1 if c is None else c, bool(c is not None and class_ok[c])) for c in vote.assignment],
            "vote": vote.label, "vote_ratio": vote.ratio,
            "vote_correct": bool(vote.winner is not None and class_ok[vote.winner]),
        })
    return records


def summarize(records: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, float]:
    """pass@1 (mean over samples), unbiased pass@k, maj@k (first k samples), with standard errors."""
    n = len(records[0]["correct"])
    out: dict[str, float] = {"n_problems": float(len(records)), "n_samples": float(n)}
    for k in sorted(set(ks) | {1}):
        if k > n:
            continue
        pk = [pass_at_k(n, sum(r["correct"]), k) for r in records]
        out[f"pass@{k}"], out[f"pass@{k}_stderr"] = mean_and_stderr(pk)
        mk = [maj_at_k_exact(r["classes"], k) for r in records]
        out[f"maj@{k}"], out[f"maj@{k}_stderr"] = mean_and_stderr(mk)
    return out


def evaluate(generate: GenerateFn, prompts: Sequence[Prompt], prompt_ids: Sequence[Sequence[int]], *,
             n: int, temperature: float, top_p: float, max_tokens: int, ks: Sequence[int],
             greedy: bool = False, extractor: str = "boxed") -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample, grade and summarise; returns (summary, per-problem records).

    `extractor` is the run's label.extractor: eval reads answers as training votes on them.
    """
    t0 = time.perf_counter()
    if greedy:
        n, temperature, top_p = 1, 0.0, 1.0
    outs = generate(list(map(list, prompt_ids)), n=n, temperature=temperature, top_p=top_p, top_k=-1,
                    max_tokens=max_tokens)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(o["token_ids"]) for row in outs for o in row)
    records = grade_samples(prompts, [[o["text"] for o in row] for row in outs], extractor)
    summary = summarize(records, [k for k in ks if k <= n])
    summary |= {"time_s": time.perf_counter() - t0, "tokens_per_s": tokens / max(gen_s, 1e-9)}
    return summary, records

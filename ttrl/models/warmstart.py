"""The demo's warm start: the tiny Qwen2 trained from scratch on easy arithmetic.

TTRL needs a starting point whose majority vote is usually right (pseudo-
labels about 80% correct): from a weaker start it learns to agree with itself
on wrong answers. So the demo model is trained by supervised learning on
worked solutions of the easy split (shorter sums and sums of the test length,
never a test problem) written by a careless teacher who forgets a carry now
and then (`ttrl.data.synthetic.scratchpad`). The model learns the slip as a
random habit: one sample is often wrong, but wrong samples scatter over
different wrong totals while right ones agree, so maj@N sits far above
pass@1 -- the gap TTRL closes without labels.

A build with model.warmstart.target_maj set ends by checking that it got
there, without the test split: sampled votes on held-out sums of the test's
length (kept out of its training data), and more steps at the floor rate
while the majority is not right often enough: how fast a model learns the
carries depends on the seed and on the CPU's float rounding.

Built once and cached under a directory named by the hash of everything
that determines it (model shape, warm-start recipe, test split); written to
a temporary dir and renamed into place, so a killed build is never reused;
a lock file beside it makes a second process that wants the same model wait
for the first one's build instead of running its own.
Plain torch in this process: no Ray, no vLLM, no DeepSpeed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ttrl.models.tiny import build_in_place, cache_root, spec_hash, tiny_spec, write_tiny_model

# Test problems every warm start leaves out (see warmstart_spec).
EXCLUDED = 256


def warmstart_spec(model_cfg: Any, synth_cfg: Any) -> dict[str, Any]:
    t, w = model_cfg.tiny, model_cfg.warmstart
    base = tiny_spec(t.hidden_size, t.num_layers, t.num_heads, t.head_dim, t.intermediate_size, t.seed,
                     max_position_embeddings=max(4096, int(model_cfg.max_model_len)))
    return {
        "base": base,
        "recipe": {"steps": w.steps, "lr": w.lr, "warmup_steps": w.warmup_steps, "min_lr_ratio": w.min_lr_ratio,
                   "batch_size": w.batch_size, "short_share": w.short_share, "slip": w.slip, "seed": w.seed,
                   "format": "scratchpad", "version": 4, **_new_keys(w)},
        # The warm start never sees the first EXCLUDED test problems (at least): a
        # test split is a prefix of a longer one with the same seed, so a smaller
        # demo (fewer problems) reuses the cached model.
        "task": {"terms": synth_cfg.terms, "digits": synth_cfg.digits,
                 "test_num": max(EXCLUDED, synth_cfg.num_problems), "test_seed": synth_cfg.seed},
    }


def _new_keys(w: Any) -> dict[str, Any]:
    """The keys added after recipe version 4, only where they are not their defaults.

    At their defaults the build is step for step the one before them, so a
    recipe that does not use them keeps its name (its cache directory) and its weights.
    """
    out: dict[str, Any] = {}
    if getattr(w, "optimizer", "adamw") != "adamw":
        out["optimizer"] = w.optimizer
    # bf16 only where the CPU multiplies bf16 natively: elsewhere (emulated) it would be slower than fp32, and the
    # recipe stays the fp32 one, with its name, its cache directory and its weights.
    if getattr(w, "precision", "fp32") == "bf16":
        from ttrl.trainer.precision import cpu_has_bf16

        if cpu_has_bf16():
            out["precision"] = "bf16"
    if getattr(w, "target_maj", None) is not None:
        out["check"] = {"target_maj": w.target_maj, "every": w.check_every,
                        "from": w.check_from if w.check_from is not None else w.steps,
                        "prompts": w.check_prompts, "votes": w.check_votes, "extend_steps": w.extend_steps}
    return out


def ensure_warmstart(model_cfg: Any, synth_cfg: Any, progress: bool = True) -> Path:
    spec = warmstart_spec(model_cfg, synth_cfg)
    final = cache_root() / "models" / f"tiny-arith-{spec_hash(spec)}"
    if (final / "ttrl_spec.json").exists():
        return final
    build_in_place(final, lambda tmp: _build(tmp, spec, progress), what="the warm start" if progress else None)
    return final


def _build(out_dir: Path, spec: dict[str, Any], progress: bool) -> None:
    write_tiny_model(spec["base"], out_dir)
    stats = train_warmstart(out_dir, spec, progress=progress)
    (out_dir / "ttrl_spec.json").write_text(json.dumps({**spec, "train_stats": stats}, indent=1))



def train_warmstart(model_dir: Path, spec: dict[str, Any], progress: bool = True,
                    on_check: Callable[[int, Any, Any], None] | None = None) -> dict[str, Any]:
    """Supervised training in place (loss on the completion tokens only)."""
    import torch

    from ttrl.malloc import tune_malloc

    # The build's tensors come and go 600 times: reuse their memory (ttrl.malloc; the same weights, 10-18% less time).
    tune_malloc()
    # vLLM, once used in this process (an in-process engine, a test before this one), caps torch at
    # one thread and replaces torch.set_num_threads with a warning: a serve test's 300-step build then
    # ran on one of two cores (784 s on a 2-core AMD EPYC). The build takes the threads a fresh process
    # would have, through torch._C's setter, and gives the old count back when it is done.
    before, threads = torch.get_num_threads(), build_threads()
    torch._C.set_num_threads(threads)
    try:
        stats = _train(model_dir, spec, progress, torch, on_check)
    finally:
        torch._C.set_num_threads(before)
    return stats | {"threads": threads}


def build_threads() -> int:
    """Torch's own default for a fresh process: OMP_NUM_THREADS if set, else the physical cores we may use.

    The warm start's weights depend on the thread count (float sums change order), so the count is the
    one a plain `make run` has always used, recorded in the model's ttrl_spec.json.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:  # psutil comes with Ray; without it, every usable CPU
        physical = usable
    return max(1, min(usable, physical))


def _train(model_dir: Path, spec: dict[str, Any], progress: bool, torch: Any,
           on_check: Callable[[int, Any, Any], None] | None = None) -> dict[str, Any]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttrl.data.synthetic import arithmetic_problems, easy_stream
    from ttrl.trainer.ds_config import lr_lambda
    from ttrl.trainer.precision import autocast_context, autocast_load_kwargs

    r, task = spec["recipe"], spec["task"]
    check = r.get("check")
    tok = AutoTokenizer.from_pretrained(model_dir)
    # bf16: the forward and backward's matmuls in bf16 (the RL update's trainer.autocast, the same two pieces);
    # weights, gradients, the optimizer and the loss's softmax stay fp32.
    cast = "bfloat16" if r.get("precision") == "bf16" else "float32"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **autocast_load_kwargs(cast))
    model.train()
    test = {p.problem for p in arithmetic_problems(task["test_num"], task["terms"], task["digits"], task["test_seed"])}
    held: list[Any] = []
    if check:
        held = held_out_sums(check["prompts"], task, test)
    stream = easy_stream(task["terms"], task["digits"], r["short_share"], r["seed"],
                         exclude=test | {p.problem for p in held}, slip=r["slip"])
    torch.manual_seed(r["seed"])
    opts = _optimizers(model, r, torch)
    eos = tok.eos_token_id
    total = r["steps"]
    limit = total + check["extend_steps"] if check else total
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="warm-starting the demo model", file=sys.stderr, disable=not progress,
               mininterval=2.0)
    ema = None
    checks: list[dict[str, float]] = []
    reached = None
    # Linear warm-up, then cosine down to lr * min_lr_ratio at the last step: the trainer's schedule;
    # past it (a build still short of its teacher) the rate stays at its floor.
    factor = lr_lambda("cosine", r["warmup_steps"], total - 1, r["min_lr_ratio"])
    step = 0
    while step < limit:
        for g in (g for opt in opts for g in opt.param_groups):
            g["lr"] = r["lr"] * (factor(step) if step < total else r["min_lr_ratio"])
        pairs = [next(stream) for _ in range(r["batch_size"])]
        seqs = []
        # One batched call per side: the fast tokenizer does the loop in Rust.
        p_ids = tok([problem for problem, _ in pairs], add_special_tokens=False)["input_ids"]
        c_ids = tok([completion for _, completion in pairs], add_special_tokens=False)["input_ids"]
        for p, c in zip(p_ids, c_ids):
            c = c + [eos]
            seqs.append((p + c, [-100] * len(p) + c))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        with autocast_context(cast):
            loss = _batch_loss(model, seqs, eos, torch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
        step += 1
        value = float(loss)
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if step > total:  # past the schedule: the bar grows rather than overflowing
            bar.total = step
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", **({"maj": f"{checks[-1]['maj']:.3f}"} if checks else {}),
                        refresh=False)
        if check and (step in (total, limit) or (step >= min(check["from"], total) and step % check["every"] == 0)):
            model.eval()
            votes = sampled_votes(model, tok, held, check["votes"], torch, seed=r["seed"] + step)
            model.train()
            checks.append({"step": step, **votes})
            if on_check is not None:
                on_check(step, model, tok)
            if votes["maj"] >= check["target_maj"]:
                reached = step
                break
    bar.close()
    model.save_pretrained(model_dir, safe_serialization=True)
    stats: dict[str, Any] = {"final_loss_ema": ema or float("nan"), "train_s": time.perf_counter() - t0,
                             "steps_run": step}
    if check:
        stats |= {"checks": checks, "reached_teacher_at": reached}
        if reached is None:
            last = checks[-1]["maj"] if checks else float("nan")
            print(f"!! the warm start stopped after {limit} steps (model.warmstart.steps={total} + extend_steps="
                  f"{check['extend_steps']}) with maj@{check['votes']} {last:.3f} on held-out sums, below "
                  f"model.warmstart.target_maj={check['target_maj']}: the model is kept; expect a weak start "
                  "(raise extend_steps for a longer build)", file=sys.stderr)
    return stats


def _optimizers(model: Any, recipe: dict[str, Any], torch: Any) -> list[Any]:
    """AdamW on everything, or (recipe optimizer "muon") Muon on the layers' matrices and AdamW on the rest."""
    if recipe.get("optimizer", "adamw") == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0)]
    from ttrl.models.muon import StackedMuon, hidden_matrices

    matrices, rest = hidden_matrices(model)
    return [StackedMuon(matrices, lr=recipe["lr"]), torch.optim.AdamW(rest, lr=recipe["lr"], weight_decay=0.0)]


def held_out_sums(count: int, task: dict[str, Any], test: set[str]) -> list[Any]:
    """`count` sums of the test's length that are not test problems (the check's prompts; kept out of training).

    Drawn like the test split but from its own seed, so they are the test's
    distribution without being the test.
    """
    from ttrl.data.synthetic import arithmetic_problems

    pool = arithmetic_problems(count + len(test), task["terms"], task["digits"], task["test_seed"] + 7919)
    return [p for p in pool if p.problem not in test][:count]


def sampled_votes(model: Any, tok: Any, problems: list[Any], votes: int, torch: Any, seed: int,
                  max_new_tokens: int = 48, batch: int = 64) -> dict[str, float]:
    """pass@1 and maj@`votes` of `model` on `problems`: `votes` samples each at temperature 1, boxed answers.

    What the demo's first eval measures on the test split, measured here on
    held-out sums with transformers' own sampling (no vLLM in this process).
    """
    from ttrl.labeling.extract import boxed

    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.get_rng_state()
    torch.set_rng_state(gen.get_state())
    side = tok.padding_side
    tok.padding_side = "left"
    hits = right = 0
    try:
        for i in range(0, len(problems), batch):
            chunk = problems[i:i + batch]
            enc = tok([p.problem for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                     num_return_sequences=votes, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for j, p in enumerate(chunk):
                h, r = tally([boxed(t) for t in texts[j * votes:(j + 1) * votes]], p.answer)
                hits, right = hits + h, right + r
    finally:
        tok.padding_side = side
        torch.set_rng_state(torch_state)
    return {"pass1": hits / (len(problems) * votes), "maj": right / len(problems)}


def tally(answers: list[str | None], truth: str) -> tuple[int, bool]:
    """(right samples, is the vote right) for one problem's sampled answers (None: no boxed answer).

    The vote is the most common answer among those given; a tie is wrong
    unless every tied answer is the truth (there is then only one): a check
    that passes on a coin flip would let a weak build through.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0, False
    best = max(counts.values())
    leaders = [a for a, n in counts.items() if n == best]
    return counts.get(truth, 0), leaders == [truth]


def _batch_loss(model: Any, seqs: list[tuple[list[int], list[int]]], eos: int, torch: Any, parts: int = 2) -> float:
    """Mean loss over the completion tokens of `seqs`, gradients accumulated: the batch's loss, backward done.

    The batch is cut by length into `parts` forward passes, each padded only to
    its own longest sequence: 2-number and 3-number sums differ by a third in
    length, and padding everything to the longest wasted about a fifth of the
    build. Each part's summed loss is divided by the whole batch's token count,
    so the gradient is the full batch's mean, as in one pass.
    """
    seqs = sorted(seqs, key=lambda s: len(s[0]))
    tokens = sum(sum(t != -100 for t in labels) for _, labels in seqs)
    size = -(-len(seqs) // parts)
    total = 0.0
    for i in range(0, len(seqs), size):
        chunk = seqs[i:i + size]
        width = max(len(ids) for ids, _ in chunk)
        # Right padding: the loss ignores it, and causal attention never looks ahead.
        input_ids = torch.tensor([ids + [eos] * (width - len(ids)) for ids, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=tokens).loss
        loss.backward()
        total += float(loss.detach())
    return total

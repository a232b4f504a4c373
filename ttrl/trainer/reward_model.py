"""The reward model: a causal LM backbone with a scalar head, trained and served on Ray.

A reward model (RM) reads "question + answer" text and returns one number.
It is `AutoModelForSequenceClassification(num_labels=1)` (for Qwen2, Llama,
Mistral: the backbone plus a bias-free linear `score` head), optionally with
LoRA adapters (peft; merged into the weights when saved). The score of a
sequence is the head's output at its last real token, found from the
attention mask (not from the pad token id: the tiny model's pad token is its
EOS, and a text may end in EOS), so left and right padding give the same
score. When the text does not end in the pad token this is exactly what
Hugging Face's own `forward` pools, so a saved RM means the same thing to
any `AutoModelForSequenceClassification` user.

Four pieces:
- `RewardModelWorker`: one DeepSpeed ZeRO rank (a Ray actor, reusing the
  `_DSWorker` plumbing of the policy workers): pairwise Bradley-Terry or
  pointwise BCE training steps, micro-batched with the same gradient
  accumulation scaling as the policy (losses are normalised by the global
  row count; DeepSpeed's division by accumulation steps and ranks is undone),
  batched scoring, reset to the initial weights, export as a HF model dir.
- `RewardModelTrainer`: the driver side, a `WorkerGroup` of those ranks:
  tokenises, packs, splits batches over ranks, runs epochs with a per-round
  LR schedule, scores lists of (prompt, response), saves.
- `RewardModelScorer`: plain torch, one process: loads a saved RM dir and
  scores batches.
- `RemoteRewardModel`: a `RewardModelScorer` in a Ray actor, started on first
  use: the scorer that the run's set-up (`ttrl.parts.reward_options`) hands
  to `reward=reward_model` (ttrl/rewards/ knows it only as a protocol).

Every saved RM dir holds `ttrl_rm.json`: the input template, max length and
output transform it was trained with, so scoring formats text the same way.
Tensor shapes are in comments; rows are sequences unless said otherwise.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ttrl.trainer.worker import _check_rows, _DSWorker

DEFAULT_TEMPLATE = "Question: {q}\n\nAnswer: {a}"
META_FILE = "ttrl_rm.json"


# ── input format (pure) ───────────────────────────────────────────────────
@dataclass
class RMFormat:
    """How (prompt, response) becomes the RM's input text, and how its score is read."""

    template: str = DEFAULT_TEMPLATE
    max_length: int = 1024
    append_eos: bool = False
    # pairwise (Bradley-Terry) | pointwise (correct/incorrect)
    mode: str = "pairwise"
    # What `reward=reward_model` returns: the raw score, or sigmoid(score) in (0, 1).
    transform: str = "raw"
    # scalar: a linear head at the last token | likelihood: head_scale * (the
    # LM's summed log-prob of the response tokens) + head_bias (`likelihood_scores`).
    head: str = "scalar"
    head_scale: float = 1.0
    head_bias: float = 0.0

    def text(self, prompt: str, response: str) -> str:
        # str.replace, not str.format: templates and texts may hold braces (\boxed{}).
        return self.template.replace("{q}", prompt).replace("{a}", response)

    def save(self, path: str | Path, **extra: Any) -> None:
        (Path(path) / META_FILE).write_text(json.dumps({**asdict(self), **extra}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> RMFormat:
        f = Path(path) / META_FILE
        if not f.exists():
            return cls()
        meta = json.loads(f.read_text())
        return cls(**{k: meta[k] for k in asdict(cls()) if k in meta})


def encode_one(tokenizer: Any, prompt: str, response: str, fmt: RMFormat) -> tuple[list[int], int]:
    """Token ids of one (prompt, response) text and the index of the response's first token.

    The start is where the ids of the text before `{a}` stop matching the
    whole text's ids, so a token that merges the prompt's last characters with
    the response's first counts as response. Truncation (from the beginning,
    as `encode`) moves the start with it.
    """
    ids = _raw_ids(tokenizer, fmt.text(prompt, response), fmt.append_eos)
    before = fmt.template.split("{a}", 1)[0].replace("{q}", prompt)
    pre = tokenizer(before, add_special_tokens=True)["input_ids"]
    start = 0
    while start < min(len(pre), len(ids)) and pre[start] == ids[start]:
        start += 1
    cut = max(0, len(ids) - fmt.max_length)
    return ids[cut:], max(0, start - cut)


def encode(tokenizer: Any, texts: list[str], fmt: RMFormat) -> list[list[int]]:
    """Token ids of each text; too long ones lose their beginning (the answer is at the end)."""
    return [_raw_ids(tokenizer, t, fmt.append_eos)[-fmt.max_length:] for t in texts]


def _raw_ids(tokenizer: Any, text: str, append_eos: bool) -> list[int]:
    """One text's ids, special tokens and (with `append_eos`) the EOS included, not truncated."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids + [eos] if append_eos and eos is not None else ids


def pack_sequences(seqs: list[list[int]], pad_id: int, width: int | None = None,
                   starts: list[int] | None = None) -> dict[str, Any]:
    """Right-padded input_ids/attention_mask/position_ids, each [b, T]; with `starts`
    (each row's first response token) also response_mask [b, T], 1 on the response."""
    import torch

    T = max(width or 0, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    if starts is not None:
        resp = torch.zeros((len(seqs), T), dtype=torch.float32)
        for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
            resp[i, st:len(s)] = 1.0
        out["response_mask"] = resp
    return out


def pack_pairs(chosen: list[list[int]], rejected: list[list[int]], pad_id: int,
               starts: tuple[list[int], list[int]] | None = None) -> dict[str, Any]:
    """chosen_* and rejected_* tensors [b, T] of one common width T (one forward pass for both)."""
    T = max(max(len(s) for s in chosen), max(len(s) for s in rejected))
    c = pack_sequences(chosen, pad_id, T, starts[0] if starts else None)
    r = pack_sequences(rejected, pad_id, T, starts[1] if starts else None)
    return {**{f"chosen_{k}": v for k, v in c.items()}, **{f"rejected_{k}": v for k, v in r.items()}}


def split_rows(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """n equal consecutive row chunks of every per-row tensor (any key names; scalars shared)."""
    from ttrl.trainer.batch import select

    rows = next(v for v in batch.values() if v.dim() > 0).shape[0]
    if rows % n:
        raise ValueError(f"cannot split a batch of {rows} rows into {n} equal parts")
    k = rows // n
    return [select(batch, slice(i * k, (i + 1) * k)) for i in range(n)]


def last_token_index(attention_mask: Any) -> Any:
    """Index of each row's last attended position: [b, T] -> [b] (left or right padding)."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(-1).argmax(-1)


def sequence_scores(model: Any, input_ids: Any, attention_mask: Any, position_ids: Any) -> Any:
    """Scalar scores [b] of a HF sequence classifier (num_labels=1), pooled at the last real token."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state                     # [b, T, H]
    values = model.score(hidden).squeeze(-1)                                  # [b, T]
    last = last_token_index(attention_mask)                                   # [b]
    return values.gather(1, last[:, None]).squeeze(1).float()                 # [b]


def response_loglik(lm: Any, input_ids: Any, attention_mask: Any, position_ids: Any, response_mask: Any) -> Any:
    """Sum of the causal LM's log-probs of the response tokens: [b] (response_mask [b, T] marks them)."""
    from ttrl.algos.losses import logprobs_from_logits

    logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False).logits                                       # [b, T, V]
    # Position t predicts token t+1: the first token has no log-prob (and is never response).
    logp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])             # [b, T-1]
    return (logp * response_mask[:, 1:].to(logp.dtype)).sum(-1)               # [b]


def head_calibration(m_good: float, m_bad: float, spread: float, target: float = 0.9) -> tuple[float, float]:
    """(scale, bias) for the likelihood head, from the median log-likelihoods of good and bad
    responses and the spread (standard deviation) of all of them.

    The midpoint of the medians maps to 0. The scale is 2 * logit(target) / max(gap, spread):
    a backbone whose good and bad responses are further apart than their spread (a judge)
    puts the medians at logit(target) and -logit(target); one whose gap is lost in the spread
    (not a judge yet) gets scores of about that size across its spread, so its sigmoids stay
    unsure instead of saturating at 0 and 1 on noise.
    """
    if not 0.5 < target < 1:
        raise ValueError(f"calibration target {target} must be in (0.5, 1)")
    width = max(m_good - m_bad, spread)
    scale = 2 * math.log(target / (1 - target)) / width if width > 1e-6 else 1.0
    return scale, -scale * (m_good + m_bad) / 2


def likelihood_scores(lm: Any, input_ids: Any, attention_mask: Any, position_ids: Any, response_mask: Any,
                      scale: float, bias: float) -> Any:
    """The likelihood head's score [b]: scale * response log-likelihood + bias."""
    return scale * response_loglik(lm, input_ids, attention_mask, position_ids, response_mask) + bias


def _rm_classes():
    import torch

    class ScalarRM(torch.nn.Module):
        """Wraps the HF classifier so that DeepSpeed's forward is our pooled score."""

        def __init__(self, hf: Any, seq_cls: Any):
            super().__init__()
            self.hf = hf              # the model DeepSpeed trains (a peft model when LoRA is on)
            self._seq_cls = [seq_cls]  # the classifier inside it (not registered twice)

        def forward(self, input_ids, attention_mask, position_ids, response_mask=None):
            return sequence_scores(self._seq_cls[0], input_ids, attention_mask, position_ids)

    class LikelihoodRM(torch.nn.Module):
        """Wraps a causal LM: the score is its scaled response log-likelihood (no new weights).

        scale and bias are plain numbers, set once from the seed data
        (`RewardModelTrainer.calibrate`), not trained: the loss moves the LM."""

        def __init__(self, hf: Any, scale: float = 1.0, bias: float = 0.0):
            super().__init__()
            self.hf = hf
            self.scale, self.bias = float(scale), float(bias)

        def forward(self, input_ids, attention_mask, position_ids, response_mask=None):
            if response_mask is None:
                raise ValueError("the likelihood head needs response_mask (which tokens are the response)")
            return likelihood_scores(self.hf, input_ids, attention_mask, position_ids, response_mask,
                                     self.scale, self.bias)

    return ScalarRM, LikelihoodRM


def build_rm_model(path: str, dtype: Any, pad_token_id: int | None, lora: dict | None = None,
                   gradient_checkpointing: bool = False, head: str = "scalar", scale: float = 1.0,
                   bias: float = 0.0) -> Any:
    """The RM on the backbone at `path`: a scalar-head classifier (head freshly initialised if absent),
    or for head="likelihood" the causal LM itself."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head not in ("scalar", "likelihood"):
        raise ValueError(f"reward model head={head!r} must be scalar or likelihood")
    if head == "likelihood":
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, torch_dtype=dtype)
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seq_cls = model
    if lora:
        from peft import get_peft_model

        from ttrl.trainer.lora import peft_lora_config

        cfg = peft_lora_config(lora, "CAUSAL_LM" if head == "likelihood" else "SEQ_CLS")
        model = get_peft_model(model, cfg)  # a `score` head stays fully trainable (modules_to_save)
        seq_cls = model.get_base_model()
    scalar_rm, likelihood_rm = _rm_classes()
    return likelihood_rm(model, scale, bias) if head == "likelihood" else scalar_rm(model, seq_cls)


# ── the DeepSpeed rank ────────────────────────────────────────────────────
class RewardModelWorker(_DSWorker):
    """One rank of the reward model: train (pairwise or pointwise), score, reset, export."""

    def setup(self, master_addr: str, master_port: int, model_path: str) -> dict:
        t0 = time.perf_counter()
        self._init_dist(master_addr, master_port)
        self.model_path = model_path
        self._build()
        return {"setup_s": time.perf_counter() - t0,
                "trainable_params": sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad)}

    def _build(self) -> None:
        import deepspeed
        import torch

        s = self.spec
        ds = self._ds_config(train=True, lr=s["lr"])
        # The same head initialisation on every rank (ZeRO-1/2 also broadcast rank 0's).
        torch.manual_seed(s["seed"])
        model = self._load(lambda: build_rm_model(self.model_path, self.torch_dtype, s["pad_token_id"],
                                                  s.get("lora"), s.get("gradient_checkpointing", False),
                                                  s.get("head", "scalar"), s.get("head_scale", 1.0),
                                                  s.get("head_bias", 0.0)), ds)
        # No scheduler: the driver sets each step's learning rate (one schedule per SER round).
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds)
        torch.manual_seed(s["seed"] + 1000 * self.rank)

    def reset(self) -> None:
        """Back to the initial weights with a fresh optimizer (SER retrains from the base each round)."""
        self.engine.destroy()
        del self.engine
        gc.collect()
        self._build()

    def set_head(self, scale: float, bias: float) -> None:
        """The likelihood head's calibration; kept in the spec, so a reset keeps it."""
        self.spec["head_scale"], self.spec["head_bias"] = float(scale), float(bias)
        self.engine.module.scale, self.engine.module.bias = float(scale), float(bias)

    def _set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr

    def _scores(self, mb: dict, prefix: str = "") -> Any:
        return self.engine(mb[f"{prefix}input_ids"], mb[f"{prefix}attention_mask"], mb[f"{prefix}position_ids"],
                           mb.get(f"{prefix}response_mask"))

    def train_step(self, batch: dict, normalizer: float, mode: str, lr: float) -> dict[str, float]:
        """One optimizer step on this rank's share of a batch of `normalizer` rows (pairs or items)."""
        import torch

        from ttrl.ser.losses import bradley_terry_loss, pointwise_loss

        self.engine.train()
        self._set_lr(lr)
        grad_accum, micro = self.spec["grad_accum"], self.spec["micro_batch_size"]
        rows = batch["labels" if mode == "pointwise" else "chosen_input_ids"].shape[0]
        _check_rows(rows, grad_accum, micro)
        # Losses are sums over rows / the global row count: undo DeepSpeed's
        # division by the accumulation steps and its average over ranks.
        scale = grad_accum * self.world_size
        loss_sum, correct, margin = 0.0, 0.0, 0.0
        for mb in self._micro_batches_any(batch):
            mb = self._to_dev(mb)
            if mode == "pairwise":
                b = mb["chosen_input_ids"].shape[0]
                both = {k: torch.cat([mb[f"chosen_{k}"], mb[f"rejected_{k}"]], 0)
                        for k in ("input_ids", "attention_mask", "position_ids", "response_mask")
                        if f"chosen_{k}" in mb}
                scores = self._scores(both)                                   # [2b]
                r_c, r_r = scores[:b], scores[b:]
                loss = bradley_terry_loss(r_c, r_r, normalizer, self.spec.get("center_coef", 0.0))
                correct += float((r_c > r_r).sum())
                margin += float((r_c - r_r).sum())
            else:
                scores = self._scores(mb)                                     # [b]
                loss = pointwise_loss(scores, mb["labels"], normalizer)
                correct += float(((scores > 0).float() == mb["labels"]).sum())
                margin += float(scores.sum())
            self.engine.backward(loss * scale)
            self.engine.step()
            loss_sum += float(loss)
        gn = self.engine.get_global_grad_norm()
        return {"loss": loss_sum, "correct": correct, "rows": float(rows), "margin_sum": margin,
                "grad_norm": float(gn) if gn is not None else float("nan")}

    def _micro_batches_any(self, batch: dict):
        from ttrl.trainer.batch import select

        mb = self.spec["micro_batch_size"]
        first = next(v for v in batch.values() if v.dim() > 0)
        for i in range(0, first.shape[0], mb):
            yield select(batch, slice(i, i + mb))

    def score(self, batch: dict) -> Any:
        """Scores [b] of this rank's rows (input_ids/attention_mask/position_ids)."""
        import torch

        from ttrl.trainer.batch import select

        self.engine.eval()
        step = self.spec.get("score_micro_batch_size") or self.spec["micro_batch_size"]
        n = batch["input_ids"].shape[0]
        parts = []
        with torch.no_grad():
            for i in range(0, n, step):
                parts.append(self._scores(self._to_dev(select(batch, slice(i, i + step)))).float().cpu())
        return torch.cat(parts, 0) if parts else torch.zeros(0)

    def _full_state_dict(self) -> dict[str, Any]:
        """Every parameter gathered (ZeRO-3) to rank 0 on CPU; all ranks must call it."""
        import deepspeed

        zero3 = self.spec["zero_stage"] == 3
        sd = {}
        for name, p in self.engine.module.named_parameters():
            if zero3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    t = p.data.detach().to("cpu").clone() if self.rank == 0 else None
            else:
                t = p.data.detach().to("cpu").clone() if self.rank == 0 else None
            if t is not None:
                sd[name] = t
        return sd

    def save_hf(self, path: str) -> str | None:
        """Export as a plain HF sequence-classification dir (LoRA merged in); rank 0 writes."""
        import torch

        sd = self._full_state_dict()
        if self.rank != 0:
            return None
        s = self.spec
        # A fresh full copy on CPU (outside any ZeRO-3 partitioning context) takes the weights.
        fresh = build_rm_model(self.model_path, torch.float32, s["pad_token_id"], s.get("lora"),
                               head=s.get("head", "scalar"))
        missing, unexpected = fresh.load_state_dict(sd, strict=False)
        # An LM head tied to the embeddings is one parameter: named once, loaded through the other name.
        tied = getattr(fresh.hf.config, "tie_word_embeddings", False)
        if unexpected or [m for m in missing if "rotary" not in m and not (tied and m.endswith("lm_head.weight"))]:
            raise RuntimeError(f"reward model export: missing {missing[:3]}, unexpected {unexpected[:3]}")
        hf = fresh.hf.merge_and_unload() if s.get("lora") else fresh.hf
        hf = hf.to(self.torch_dtype)
        hf.save_pretrained(path, safe_serialization=True)
        return path


# ── the driver side ───────────────────────────────────────────────────────
@dataclass
class FitStats:
    loss: float
    accuracy: float
    steps: int
    seconds: float
    grad_norm: float


class RewardModelTrainer:
    """A group of `RewardModelWorker` ranks, driven from the SER loop (Ray must be up)."""

    def __init__(self, model_path: str, tokenizer: Any, fmt: RMFormat, *, num_workers: int, zero_stage: int,
                 batch_size: int, micro_batch_size: int, lr: float, lr_schedule: str, warmup_ratio: float,
                 min_lr_ratio: float, weight_decay: float, grad_clip: float, epochs: int, min_steps: int,
                 device: str, dtype: str, seed: int, lora: dict | None = None, offload: bool = False,
                 gradient_checkpointing: bool = False, score_micro_batch_size: int = 64,
                 num_gpus_per_worker: float = 0.0, center_coef: float = 0.0):
        from ttrl.distributed.group import WorkerGroup

        if batch_size % (num_workers * micro_batch_size):
            raise ValueError(f"reward model batch of {batch_size} must split into {num_workers} ranks x "
                             f"micro-batches of {micro_batch_size}")
        self.model_path, self.tokenizer, self.fmt = model_path, tokenizer, fmt
        self.batch_size, self.lr, self.lr_schedule = batch_size, lr, lr_schedule
        self.warmup_ratio, self.min_lr_ratio = warmup_ratio, min_lr_ratio
        self.epochs, self.min_steps = epochs, min_steps
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._cache: dict[str, tuple[list[int], int]] = {}
        self.calibrated = fmt.head != "likelihood"
        spec = dict(device=device, dtype=dtype, seed=seed, zero_stage=zero_stage,
                    micro_batch_size=micro_batch_size, grad_accum=batch_size // num_workers // micro_batch_size,
                    betas=[0.9, 0.999], weight_decay=weight_decay, grad_clip=grad_clip, offload=offload, lr=lr,
                    pad_token_id=self.pad_id, lora=lora, gradient_checkpointing=gradient_checkpointing,
                    score_micro_batch_size=score_micro_batch_size, center_coef=center_coef, head=fmt.head,
                    head_scale=fmt.head_scale, head_bias=fmt.head_bias)
        t0 = time.perf_counter()
        self.group = WorkerGroup(RewardModelWorker, num_workers, spec, name="reward_model",
                                 num_gpus=num_gpus_per_worker)
        self.setup_info = self.group.setup(model_path)[0]
        self.startup_s = time.perf_counter() - t0

    @classmethod
    def from_config(cls, cfg: Any, model_path: str, tokenizer: Any, device: str, dtype: str) -> RewardModelTrainer:
        s, r = cfg.ser, cfg.ser.rm
        fmt = RMFormat(template=r.template, max_length=r.max_length, append_eos=r.append_eos,
                       mode=s.mode, transform=s.reward_transform or ("sigmoid" if s.mode == "pointwise" else "raw"),
                       head=r.head)
        from ttrl.rollout.lora import lora_spec

        lora = lora_spec(s.lora)  # ser.lora: the policy's LoRA schema
        gpu = device == "cuda"
        return cls(model_path, tokenizer, fmt, num_workers=r.num_workers, zero_stage=r.zero_stage,
                   batch_size=r.batch_size, micro_batch_size=r.micro_batch_size, lr=r.lr,
                   lr_schedule=r.lr_schedule, warmup_ratio=r.warmup_ratio, min_lr_ratio=0.0,
                   weight_decay=r.weight_decay, grad_clip=r.grad_clip, epochs=r.epochs,
                   min_steps=r.min_steps, device=device, dtype=dtype, seed=cfg.seed + r.seed, lora=lora,
                   offload=r.offload, gradient_checkpointing=r.gradient_checkpointing,
                   score_micro_batch_size=s.score_batch_size, num_gpus_per_worker=1.0 if gpu else 0.0,
                   center_coef=r.center_coef)

    # ── tokens ────────────────────────────────────────────────────────────
    def _ids(self, prompt: str, response: str) -> tuple[list[int], int]:
        """Token ids of the RM's text and the index of the response's first token."""
        key = f"{len(prompt)}:{prompt}{response}"
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = encode_one(self.tokenizer, prompt, response, self.fmt)
        return got

    def _packed(self, pairs: list[tuple[list[int], int]]) -> dict[str, Any]:
        likelihood = self.fmt.head == "likelihood"
        return pack_sequences([i for i, _ in pairs], self.pad_id, starts=[s for _, s in pairs] if likelihood else None)

    # ── the likelihood head's calibration ─────────────────────────────────
    def calibrate(self, rows: list[Any], target: float = 0.9) -> dict[str, float]:
        """Set the likelihood head's scale and bias from labelled rows, once, before the first fit.

        Raw log-likelihoods of the good and bad responses (chosen/rejected, or
        correct/incorrect) have medians m_good, m_bad; `head_calibration` maps
        them to about logit(`target`) and -logit(`target`), so sigmoid(score)
        reads as "how sure that this response is the good one" and SER's
        thresholds (ser.high/low/min_gap) mean what they say; a backbone that
        cannot judge yet gets unsure scores, not saturated ones.
        """
        import statistics

        self.group.call("set_head", 1.0, 0.0)  # raw log-likelihoods
        if self.fmt.mode == "pairwise":
            good = self.score([r.prompt for r in rows], [r.chosen for r in rows])
            bad = self.score([r.prompt for r in rows], [r.rejected for r in rows])
        else:
            good = self.score([r.prompt for r in rows if r.correct], [r.response for r in rows if r.correct])
            bad = self.score([r.prompt for r in rows if not r.correct], [r.response for r in rows if not r.correct])
        m_good = statistics.median(good) if good else 0.0
        m_bad = statistics.median(bad) if bad else m_good
        spread = statistics.pstdev(good + bad) if len(good + bad) > 1 else 0.0
        scale, bias = head_calibration(m_good, m_bad, spread, target)
        self.group.call("set_head", scale, bias)
        self.fmt.head_scale, self.fmt.head_bias = scale, bias
        self.calibrated = True
        self.calibration = {"median_loglik_good": m_good, "median_loglik_bad": m_bad, "spread": spread,
                            "scale": scale,
                            "bias": bias, "rows": float(len(rows))}
        return self.calibration

    # ── training ──────────────────────────────────────────────────────────
    def num_steps(self, n_rows: int) -> int:
        return max(self.epochs * math.ceil(n_rows / self.batch_size), self.min_steps)

    def fit(self, rows: list[Any], seed: int) -> FitStats:
        """Train on `rows`: PreferencePair (pairwise) or PointItem with `correct` set (pointwise).

        Passes over the rows in a fresh random order each epoch, in batches
        of exactly `batch_size` (the last batch of a pass is topped up from the
        next pass), for `num_steps` optimizer steps on a warmup + decay schedule.
        """
        from ttrl.trainer.ds_config import lr_lambda

        if not rows:
            raise ValueError("reward model: nothing to train on")
        if not self.calibrated:  # the likelihood head, first fit: from the seed rows
            self.calibrate(rows)
        t0 = time.perf_counter()
        mode = self.fmt.mode
        total = self.num_steps(len(rows))
        sched = lr_lambda(self.lr_schedule, round(self.warmup_ratio * total), total, self.min_lr_ratio)
        rng = random.Random(seed)
        order: list[int] = []
        W = self.group.world_size
        loss_sum, correct, seen, gn = 0.0, 0.0, 0.0, 0.0
        for step in range(total):
            while len(order) < self.batch_size:
                perm = list(range(len(rows)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[:self.batch_size], order[self.batch_size:]
            batch = self._pack([rows[i] for i in idx], mode)
            per_rank = self.group.call_sharded("train_step", split_rows(batch, W), float(self.batch_size), mode,
                                               self.lr * sched(step))
            loss_sum += sum(r["loss"] for r in per_rank)
            correct += sum(r["correct"] for r in per_rank)
            seen += sum(r["rows"] for r in per_rank)
            gn = per_rank[0]["grad_norm"]
        return FitStats(loss=loss_sum / total, accuracy=correct / max(seen, 1), steps=total,
                        seconds=time.perf_counter() - t0, grad_norm=gn)

    def _pack(self, rows: list[Any], mode: str) -> dict[str, Any]:
        import torch

        likelihood = self.fmt.head == "likelihood"
        if mode == "pairwise":
            c = [self._ids(r.prompt, r.chosen) for r in rows]
            j = [self._ids(r.prompt, r.rejected) for r in rows]
            return pack_pairs([i for i, _ in c], [i for i, _ in j], self.pad_id,
                              ([s for _, s in c], [s for _, s in j]) if likelihood else None)
        batch = self._packed([self._ids(r.prompt, r.response) for r in rows])
        batch["labels"] = torch.tensor([1.0 if r.correct else 0.0 for r in rows])
        return batch

    # ── scoring ───────────────────────────────────────────────────────────
    def score(self, prompts: list[str], responses: list[str], chunk: int = 512) -> list[float]:
        """Raw scores of (prompt, response) pairs, spread over the ranks."""
        import torch

        W = self.group.world_size
        out: list[float] = []
        for i in range(0, len(prompts), chunk):
            seqs = [self._ids(p, r) for p, r in zip(prompts[i:i + chunk], responses[i:i + chunk])]
            n = len(seqs)
            seqs += seqs[: (-n) % W]  # equal shares per rank (ZeRO-3 forwards are collective)
            batch = self._packed(seqs)
            parts = self.group.call_sharded("score", split_rows(batch, W))
            out += torch.cat(parts, 0)[:n].tolist()
        return out

    # ── lifecycle ─────────────────────────────────────────────────────────
    def reset(self) -> None:
        self.group.call("reset")

    def save(self, path: str | Path, **meta: Any) -> Path:
        """A HF model dir (weights, tokenizer, ttrl_rm.json), written to a temp dir and renamed."""
        import shutil

        final = Path(path)
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self.group.call("save_hf", str(tmp))
        self.tokenizer.save_pretrained(tmp)
        self.fmt.save(tmp, base_model=self.model_path, **meta)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def shutdown(self) -> None:
        self.group.kill()


# ── serving a saved reward model ──────────────────────────────────────────
class RewardModelScorer:
    """Loads a saved RM dir and scores (prompt, response) batches; plain torch, one process."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", batch_size: int = 64):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.device, self.batch_size = device, batch_size
        self.fmt = RMFormat.load(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.fmt.head == "likelihood":
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=getattr(torch, dtype)).to(device).eval()
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, torch_dtype=getattr(torch, dtype)).to(device).eval()
        pad = self.model.config.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "transform": self.fmt.transform, "template": self.fmt.template,
                "pid": os.getpid()}

    def score(self, prompts: list[str], responses: list[str], transform: str | None = None) -> list[float]:
        """One number per (prompt, response): the raw score, or sigmoid(score) (`transform`)."""
        import torch

        transform = transform or self.fmt.transform
        likelihood = self.fmt.head == "likelihood"
        encoded = [encode_one(self.tokenizer, p, r, self.fmt) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(encoded), self.batch_size):
                part = encoded[i:i + self.batch_size]
                batch = pack_sequences([ids for ids, _ in part], self.pad_id,
                                       starts=[st for _, st in part] if likelihood else None)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                if likelihood:
                    s = likelihood_scores(self.model, batch["input_ids"], batch["attention_mask"],
                                          batch["position_ids"], batch["response_mask"], self.fmt.head_scale,
                                          self.fmt.head_bias)
                else:
                    s = sequence_scores(self.model, batch["input_ids"], batch["attention_mask"],
                                        batch["position_ids"])
                if transform == "sigmoid":
                    s = torch.sigmoid(s)
                out += s.float().cpu().tolist()
        return out


class RemoteRewardModel:
    """The scorer that `reward=reward_model` is handed (`ttrl.rewards.reward_model.RewardScorer`):
    a `RewardModelScorer` in a Ray actor, started on the first `score` (the run builds its reward
    before the Runtime starts Ray). The actor asks Ray for no CPU slot by default: it works only
    while the loop waits for it, and the Runtime sizes a local cluster to its own actors exactly.
    `transform` (raw | sigmoid | None = what the RM dir's ttrl_rm.json says) applies to every score."""

    def __init__(self, path: str, transform: str | None = None, batch_size: int = 64, num_cpus: float = 0.0,
                 num_gpus: float = 0.0, device: str = "auto"):
        if transform not in (None, "raw", "sigmoid"):
            raise ValueError(f"reward 'reward_model': transform={transform!r} must be raw, sigmoid or None")
        self.path, self.transform, self.batch_size = path, transform, batch_size
        self.num_cpus, self.num_gpus, self.device = num_cpus, num_gpus, device
        self._actor: Any = None

    def _scorer(self) -> Any:
        if self._actor is None:
            import ray

            if not ray.is_initialized():
                raise RuntimeError("reward 'reward_model' scores in a Ray actor, and Ray is not running")
            cls = ray.remote(RewardModelScorer)
            self._actor = cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(
                self.path, self.device, "auto", self.batch_size)
        return self._actor

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        import ray

        return ray.get(self._scorer().score.remote(prompts, completions, self.transform))

    def close(self) -> None:
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None

"""DeepSpeed training workers, one per rank, each hosted in a Ray actor.

`PolicyWorker` holds the policy (trained) and, when KL is used, a frozen
reference copy on the same ranks; `CriticWorker` holds the value model for
PPO. Each worker group is its own torch.distributed world (gloo on CPU,
NCCL on GPU). The driver hands each rank its shard of a batch; the ranks
never talk to the driver about ground truth or rewards, only tensors.

Weights leave the policy through `push_weights`: all ranks take part in
gathering (ZeRO-3 gathers one layer at a time), rank 0 packs the tensors
and hands them to every rollout engine.

With `spec["lora"]` (model.lora.enabled) the policy (and the critic) is the
base plus peft adapters (`lora.py`), only the adapters train, and every
path above moves the adapter alone (`_sync_params`); the reference is the
policy with its adapter switched off, and checkpoints keep the adapter and
its optimizer state, not the frozen base.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from ttrl.trainer.options import UpdateOptions

WorkerSpec = dict[str, Any]
# Update stats that add up, over a rank's micro-batches and over ranks: losses
# normalised by the whole mini-batch's count (each part is a share of the
# total), and sums with their counts. Every other stat is averaged.
ADDITIVE_STATS = frozenset({"pg_loss", "kl_loss", "vf_loss", "entropy_sum", "entropy_n", "logprob_diff_sum",
                            "logprob_diff_n", "zero_adv_rows", "rows"})


def _setup_env(rank: int, world_size: int, master_addr: str, master_port: int, device: str) -> None:
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0" if device == "cpu" else os.environ.get("LOCAL_RANK", "0"),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
    })
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"


def _check_rows(rows: int, grad_accum: int, micro: int) -> None:
    # DeepSpeed steps the optimizer after exactly `grad_accum` micro-batches;
    # any other count would silently carry gradients into the next call.
    if rows != grad_accum * micro:
        raise ValueError(f"a rank got {rows} rows for one optimizer step, expected "
                         f"{grad_accum} micro-batches of {micro}")


def _engines_get(refs: list) -> list:
    """ray.get on rollout engines' calls; an engine that died or gave up a sync -> EngineSyncError.

    The driver restarts and re-syncs engines on EngineSyncError; anything
    else (an engine refusing the weights' names or shapes) stays fatal.
    """
    import ray
    from ray.exceptions import RayActorError

    from ttrl.rollout.weights import EngineSyncError

    try:
        return ray.get(refs)
    except EngineSyncError as err:  # an engine's own (Ray wraps it: keep the message, drop the wrapper)
        raise EngineSyncError(str(getattr(err, "cause", err))) from None
    except RayActorError as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise EngineSyncError(f"weight sync: a rollout engine died during the sync ({type(err).__name__}: "
                              f"{first})") from None


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def _lighten_deepspeed(device: str) -> None:
    """Leave out two things DeepSpeed does at every start that this project never uses.

    - ZeRO's optimizer checks import DeepSpeed's Muon optimizer to ask
      `isinstance(optimizer, MuonWithAuxAdam)`; that module torch.compile()s
      kernels when imported, pulling in inductor (about 1.5 s a rank, every
      start). A stand-in module whose class nothing is an instance of
      answers the same question. (Muon is never this project's optimizer.)
    - On CPU its gloo backend builds a shared-memory all-reduce kernel: a C++
      compile of about a minute the first time on a machine (then 1 s to load
      at every start), for collectives that gloo runs in milliseconds at this
      project's CPU sizes. Without it DeepSpeed uses gloo's own.
    Both touch DeepSpeed 0.19's internals by name; a version without them is
    left alone.
    """
    import sys
    import types

    if MUON_MODULE not in sys.modules:
        stub = types.ModuleType(MUON_MODULE)
        stub.__doc__ = "ttrl's stand-in: the Muon optimizer is never used (see ttrl.trainer.worker)."

        class MuonWithAuxAdam:  # never instantiated: `isinstance(x, MuonWithAuxAdam)` is False for all x
            pass

        stub.MuonWithAuxAdam = MuonWithAuxAdam
        sys.modules[MUON_MODULE] = stub
    if device == "cpu":
        import importlib

        # By module path: `import deepspeed.comm.torch as m` would bind deepspeed.comm's attribute `torch`.
        ds_torch = importlib.import_module("deepspeed.comm.torch")
        if hasattr(ds_torch, "build_shm_op"):
            ds_torch.build_shm_op = lambda: None


class _DSWorker:
    """Common plumbing: process group, model loading, forward passes."""

    def __init__(self, rank: int, world_size: int, spec: WorkerSpec):
        self.rank, self.world_size, self.spec = rank, world_size, spec
        self.device = spec["device"]

    def node_address(self) -> tuple[str, int]:
        """This node's IP and a free port (asked of rank 0 for the rendezvous)."""
        import ray

        from ttrl.distributed.ports import free_port

        return ray.util.get_node_ip_address(), free_port("")

    def pid(self) -> int:
        return os.getpid()

    def _times(self, t0: float) -> dict[str, float]:
        """What setup() returns: its seconds, and the wall-clock times of the start-up line."""
        from ttrl.distributed.startup import process_created

        return {"setup_s": time.perf_counter() - t0, "t_spawned": process_created(),
                "t_imported": self.t_imported, "t_ready": time.time()}

    def _init_dist(self, master_addr: str, master_port: int) -> None:
        _setup_env(self.rank, self.world_size, master_addr, master_port, self.device)
        _lighten_deepspeed(self.device)
        import deepspeed
        import torch
        import transformers  # noqa: F401 - imported here so that the start-up line counts it as an import

        self.t_imported = time.time()

        if self.device == "cpu":
            # Ray pins OMP threads per actor; keep torch consistent with it.
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        else:
            torch.cuda.set_device(0)  # Ray exposes one GPU per worker as device 0
        deepspeed.init_distributed(dist_backend="gloo" if self.device == "cpu" else "nccl", verbose=False)
        torch.manual_seed(self.spec["seed"] + self.rank)

    @property
    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.spec["dtype"]]

    def _ds_config(self, train: bool, lr: float) -> dict:
        from ttrl.trainer.ds_config import build_ds_config

        s = self.spec
        return build_ds_config(
            zero_stage=s["zero_stage"], micro_batch_size=s["micro_batch_size"], grad_accum=s["grad_accum"],
            world_size=self.world_size, lr=lr, betas=tuple(s["betas"]), weight_decay=s["weight_decay"],
            grad_clip=s["grad_clip"], dtype=s["dtype"], device=self.device, offload=s["offload"], train=train)

    def _load(self, loader, ds_config: dict):
        """Load a HF model; under ZeRO-3, straight into partitions (no full copy per rank)."""
        keep = None
        if ds_config["zero_optimization"]["stage"] == 3:
            from transformers.integrations import HfDeepSpeedConfig

            keep = HfDeepSpeedConfig(ds_config)  # must stay alive during from_pretrained
        model = loader()
        del keep
        return model

    def _wrap(self, model, ds_config: dict, train: bool, total_opt_steps: int = 1):
        import deepspeed
        import torch

        if not train:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            if ds_config["zero_optimization"]["stage"] != 3:
                # Nothing to shard: a plain module on the device is the fastest reference.
                dev = "cpu" if self.device == "cpu" else "cuda"
                return model.to(dev)
            engine, *_ = deepspeed.initialize(model=model, config=ds_config)
            return engine
        from ttrl.trainer.ds_config import lr_lambda

        s = self.spec
        sched = lr_lambda(s["lr_schedule"], s["warmup_steps"], total_opt_steps, s["min_lr_ratio"])
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched))
        return engine

    @property
    def lora(self) -> dict | None:
        """The LoRA spec (ttrl.rollout.lora.lora_spec) when this group trains adapters, else None."""
        return self.spec.get("lora")

    def _with_adapter(self, model, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
        """`model` wrapped in LoRA adapters when the spec asks for them (before DeepSpeed), else itself.

        With `lora_path` (model.lora.path) the adapters start from that dir's tensors.
        """
        if self.lora is None:
            return model
        from ttrl.trainer.lora import load_into, wrap

        model = wrap(model, self.lora, self.spec["seed"], task_type, modules_to_save)
        path = self.spec.get("lora_path")
        if path and task_type == "CAUSAL_LM":
            from ttrl.rollout.lora import read_tensors

            load_into(model, read_tensors(path), path)
        return model

    def trainable_names(self) -> list[str]:
        """Names of the parameters this rank trains (what its optimizer holds): with LoRA, the adapter's."""
        return [n for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def _save_state(self, path: str, tag: str) -> None:
        # With LoRA the frozen base is left out: it is the model dir the run started from.
        self.engine.save_checkpoint(path, tag=tag, exclude_frozen_parameters=self.lora is not None)

    def _load_state(self, path: str, tag: str) -> None:
        # Not strict with LoRA: the checkpoint holds the adapters alone, the base is already loaded.
        self.engine.load_checkpoint(path, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                    load_module_strict=self.lora is None)

    def release_memory(self) -> int:
        """Hand the GPU memory torch keeps cached (freed activations, gradients) back to the driver.

        Colocated engines wake into what the driver has free, not into
        torch's cache; without this an engine waking after an update can run
        out of memory that this process is not using. Returns the bytes released.
        """
        import gc

        import torch

        if not torch.cuda.is_available():
            return 0
        gc.collect()
        before = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        return int(before - torch.cuda.memory_reserved())

    def scale_lr(self, factor: float) -> float:
        """Multiply the learning rate (and the schedule's peak) by `factor`."""
        sched = self.engine.lr_scheduler
        if sched is not None and hasattr(sched, "base_lrs"):
            sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        for g in self.engine.optimizer.param_groups:
            g["lr"] *= factor
        return float(self.engine.get_lr()[0])

    def _to_dev(self, batch: dict):
        dev = "cpu" if self.device == "cpu" else "cuda"
        return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}

    def _micro_batches(self, batch: dict, no_grad: bool = False) -> Iterator[tuple[Any, dict]]:
        """(rows, micro-batch) pairs, longest responses first, each cut to its own lengths.

        Rows of similar length share a micro-batch, so little compute goes to
        padding (responses of one step differ a lot in length). Every row is
        in exactly one micro-batch and their number is unchanged, so sums over
        them (losses with a global normaliser, gradient accumulation) are too.
        `no_grad` passes take `logprob_micro_batch_size` rows at a time.
        """
        import torch

        from ttrl.trainer.batch import batch_size, select, trim_padding

        mb = self.spec.get("logprob_micro_batch_size") if no_grad else None
        mb = mb or self.spec["micro_batch_size"]
        B = batch_size(batch)
        order = torch.argsort(batch["response_mask"].sum(1), descending=True, stable=True)
        for i in range(0, B, mb):
            rows = order[i:i + mb]
            yield rows, trim_padding(select(batch, rows))

    @staticmethod
    def _scatter_rows(parts: list, batch: dict) -> Any:
        """Per-micro-batch [b, r] results back into one [B, R] tensor in the batch's row order."""
        import torch

        B, R = batch["response_mask"].shape
        out = torch.zeros((B, R), dtype=torch.float32)
        for rows, t in parts:
            out[rows, :t.shape[1]] = t.float().cpu()
        return out


class PolicyWorker(_DSWorker):
    """The policy (actor) on one rank, plus the frozen reference when KL is on."""

    autocast = "float32"  # trainer.autocast as resolved on this rank by setup

    def setup(self, master_addr: str, master_port: int, model_path: str, total_opt_steps: int) -> dict:
        t0 = time.perf_counter()
        self._init_dist(master_addr, master_port)
        from transformers import AutoModelForCausalLM

        from ttrl.trainer.precision import autocast_load_kwargs, resolve_autocast

        s = self.spec
        ds_train = self._ds_config(train=True, lr=s["lr"])
        # Specs made by hand (tests) without the key keep fp32.
        self.autocast = resolve_autocast(s.get("autocast", "float32"), self.device, s["dtype"])
        attn = autocast_load_kwargs(self.autocast)

        def load():
            return AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=self.torch_dtype, **attn)

        model = self._load(load, ds_train)
        if s["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model = self._with_adapter(model)
        self.backward_products = self._backward_products(model)
        self.engine = self._wrap(model, ds_train, train=True, total_opt_steps=total_opt_steps)
        self.ref = None
        if s["with_ref"]:
            ds_ref = self._ds_config(train=False, lr=s["lr"])
            self.ref = self._wrap(self._load(load, ds_ref), ds_ref, train=False)
        return self._times(t0) | {"backward_products": self.backward_products, "autocast": self.autocast}

    def _backward_products(self, model) -> str:
        """trainer.backward_products, resolved on this rank's CPU, applied to `model`'s linears."""
        from ttrl.trainer.precision import bf16_backward_products, resolve_backward_products

        s = self.spec
        # Specs made by hand (tests) without the key keep the exact fp32 backward.
        which = resolve_backward_products(s.get("backward_products", "float32"), self.device, s["dtype"],
                                          s["zero_stage"], autocast=self.autocast)
        if which == "bfloat16":
            bf16_backward_products(model)
        return which

    # ── forward passes ────────────────────────────────────────────────────
    def _prompt_once(self) -> bool:
        """trainer.prompt_once where it pays: not under ZeRO-3 (a second forward is a second gather of every
        parameter) nor with gradient checkpointing (HF turns the prompt's cache off there)."""
        s = self.spec
        return bool(s.get("prompt_once", False)) and s["zero_stage"] < 3 and not s["gradient_checkpointing"]

    def _response_logits(self, model, batch: dict) -> Any:
        """Logits [b, R, V] at the positions that predict the response tokens (column t predicts token t).

        With trainer.prompt_once, rows that share a prompt (a group's samples)
        run it once: its keys and values are repeated for each row and the
        responses attend to them, so the update and its backward skip the
        repeated prompt tokens; the log-probs are the full forward's to float
        rounding (tests/unit/trainer/test_trainer_pure.py). Under trainer.autocast
        the forward runs in bf16 and the logits come back as fp32, so the
        log-softmax over the vocabulary is fp32.
        """
        from ttrl.trainer.precision import autocast_context

        with autocast_context(self.autocast):
            return self._response_logits_as_is(model, batch).float()

    def _response_logits_as_is(self, model, batch: dict) -> Any:
        import torch

        from ttrl.trainer.batch import response_slice, shared_prompts

        shared = shared_prompts(batch) if self._prompt_once() else None
        if shared is None:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=False)
            return out.logits[:, response_slice(batch)]
        from transformers.cache_utils import DynamicCache

        first, inverse = shared
        P = int(batch["prompt_width"])
        R = batch["response_mask"].shape[1]
        ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
        # The distinct prompts; only their last position's logits are needed (they predict response token 0).
        head = model(input_ids=ids[first, :P], attention_mask=mask[first, :P], position_ids=pos[first, :P],
                     use_cache=True, logits_to_keep=1)
        logits0 = head.logits[inverse]  # [b, 1, V]
        if R == 1:
            return logits0
        # Each row's copy of its prompt's keys and values (indexing keeps the gradient to the prompt's pass).
        cache = DynamicCache(ddp_cache_data=[(k[inverse], v[inverse]) for k, v, *_ in head.past_key_values])
        # Response tokens 0..R-2 predict tokens 1..R-1; the last token predicts nothing that is scored.
        tail = model(input_ids=ids[:, P:P + R - 1], attention_mask=mask[:, :P + R - 1],
                     position_ids=pos[:, P:P + R - 1], past_key_values=cache, use_cache=True)
        return torch.cat([logits0, tail.logits], 1)

    def _logp(self, model, batch: dict, temperature: float, with_entropy: bool = False,
              entropy_grad: bool = False):
        from ttrl.algos import entropy_from_logits, logprobs_from_logits

        logits = self._response_logits(model, batch) / temperature  # [b, R, V]
        R = batch["response_mask"].shape[1]
        P = int(batch["prompt_width"])
        targets = batch["input_ids"][:, P:P + R]  # [b, R]
        logp = logprobs_from_logits(logits, targets)
        ent = None
        if with_entropy:
            # Gradient through the entropy only when it is a loss term (costly).
            ent = entropy_from_logits(logits if entropy_grad else logits.detach())
        return logp, ent

    def compute_logprobs(self, batch: dict, temperature: float, which: str = "policy") -> Any:
        """Log-probs [b, R] of the response tokens under the policy or the reference."""
        import contextlib

        import torch

        lora_ref = which == "ref" and self.lora is not None
        model = self.engine if which == "policy" or lora_ref else self.ref
        if model is None:
            raise RuntimeError("reference log-probs asked for, but no reference model was loaded")
        if model is self.engine:
            self.engine.eval()
        # With LoRA the reference is the base: the policy with its adapter switched off, no second copy.
        off = self.engine.module.disable_adapter() if lora_ref else contextlib.nullcontext()
        parts = []
        with torch.no_grad(), off:
            for rows, mb in self._micro_batches(batch, no_grad=True):
                logp, _ = self._logp(model, self._to_dev(mb), temperature)
                parts.append((rows, logp))
        return self._scatter_rows(parts, batch)

    def compute_token_stats(self, batch: dict, temperature: float) -> tuple[Any, Any]:
        """Entropy and self-certainty [b, R] of the policy's next-token distribution at each response token.

        For the intrinsic rewards (token_entropy, self_certainty): they need the
        whole distribution, which the engines do not return (only the sampled
        token's log-prob). Each micro-batch's [b, r, V] logits are reduced to
        two numbers per token before the next one is computed, as the
        log-prob pass does, so the memory is the log-prob pass's.
        """
        import torch

        from ttrl.algos import entropy_from_logits, self_certainty_from_logits

        self.engine.eval()
        ent_parts, sc_parts = [], []
        with torch.no_grad():
            for rows, mb in self._micro_batches(batch, no_grad=True):
                mb = self._to_dev(mb)
                logits = self._response_logits(self.engine, mb) / temperature  # [b, r, V]
                ent_parts.append((rows, entropy_from_logits(logits)))
                sc_parts.append((rows, self_certainty_from_logits(logits)))
                del logits
        return self._scatter_rows(ent_parts, batch), self._scatter_rows(sc_parts, batch)

    @staticmethod
    def _token_sums(mb: dict, logp: Any, ent: Any) -> dict[str, Any]:
        """The per-token sums of a micro-batch that the step's metrics divide out: entropy and, when the loop
        left pi_old to the update (no old_logp), the engine-vs-trainer log-prob gap of the same tokens."""
        mask = mb["response_mask"]
        # Reported per token whatever the loss aggregation, so that the metric (and
        # the guard's threshold on it) means the same for every algorithm.
        out = {"entropy_sum": (ent.detach() * mask).sum(), "entropy_n": mask.sum()}
        if mb.get("old_logp") is None:
            out |= {"logprob_diff_sum": ((mb["behavior_logp"] - logp.detach()).abs() * mask).sum(),
                    "logprob_diff_n": mask.sum()}
        return out

    def _no_grad_stats(self, batch: dict, temperature: float, sums: dict[str, float]) -> None:
        """Add the `_token_sums` of rows that skip the backward to `sums`."""
        import torch

        with torch.no_grad():
            for _, mb in self._micro_batches(batch, no_grad=True):
                mb = self._to_dev(mb)
                logp, ent = self._logp(self.engine, mb, temperature, with_entropy=True)
                for k, v in self._token_sums(mb, logp, ent).items():
                    sums[k] = sums.get(k, 0.0) + float(v)

    # ── update ────────────────────────────────────────────────────────────
    def train_step(self, batch: dict, normalizer: float, opts: UpdateOptions,
                   inject_nan: bool = False) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch (micro-batched).

        loss = pg_loss + kl_coef * kl_loss - entropy_coef * entropy; pg_loss
        and kl_loss are reported apart. `inject_nan` makes the loss NaN (a
        fault for the guard's tests). With `opts.skips_zero_advantage`, rows
        of zero advantage get a no-grad forward (their entropy is reported
        with the rest) instead of a backward; clip_frac and approx_kl are then
        over the rows that carry gradient.
        """

        from ttrl.algos import aggregate, kl, policy_loss
        from ttrl.trainer.batch import (
            batch_size,
            gradient_micro_batches,
            select,
            trim_padding,
            zero_advantage_rows,
        )

        self.engine.train()
        lr_used = float(self.engine.get_lr()[0])  # the scheduler moves on after the step
        n_micro = 0
        sums: dict[str, float] = {}
        grad_accum = self.spec["grad_accum"]
        _check_rows(batch_size(batch), grad_accum, self.spec["micro_batch_size"])
        # DeepSpeed divides by the accumulation steps and averages over ranks;
        # the losses are already normalised by the global count, so undo both.
        scale = grad_accum * self.world_size
        zero = zero_advantage_rows(batch)
        sums["zero_adv_rows"] = float(zero.sum())
        sums["rows"] = float(batch_size(batch))
        micro_batches: Iterable[tuple[Any, dict]]
        if opts.skips_zero_advantage:
            # Rows of zero advantage skip the backward (their loss term is 0 * ratio); the rest fill the
            # same number of micro-batches. Their metrics first, while these weights are still pi_old's.
            sets, rest = gradient_micro_batches(batch, zero, grad_accum)
            if len(rest):
                self._no_grad_stats(select(batch, rest), opts.temperature, sums)
            micro_batches = ((rows, trim_padding(select(batch, rows))) for rows in sets)
        else:
            micro_batches = self._micro_batches(batch)
        for _, mb in micro_batches:
            mb = self._to_dev(mb)
            mask = mb["response_mask"]
            logp, ent = self._logp(self.engine, mb, opts.temperature, with_entropy=True,
                                   entropy_grad=opts.entropy_coef > 0)
            old_logp = mb.get("old_logp")
            if old_logp is None:
                # The loop left old_logp to us (a single update per batch):
                # these weights are pi_old, so their own log-probs, detached, are it.
                old_logp = logp.detach()
            loss, stats = policy_loss(
                opts.policy_loss, logp, old_logp, mb["advantages"], mask,
                clip_low=opts.clip_low, clip_high=opts.clip_high, dual_clip=opts.dual_clip,
                agg_mode=opts.loss_agg, normalizer=normalizer,
                # Off-policy samples (overlap mode): reweight by pi_old / pi_behaviour, capped.
                behavior_logp=mb["behavior_logp"] if opts.tis_cap else None,
                tis_cap=opts.tis_cap)
            stats["pg_loss"] = loss.detach()
            if opts.kl_coef > 0 and not opts.kl_in_reward:
                kl_tok = kl(opts.kl_estimator, logp, mb["ref_logp"])                   # [b, R]
                kl_loss = aggregate(kl_tok, mask, opts.loss_agg, normalizer=normalizer)
                loss = loss + opts.kl_coef * kl_loss
                stats["kl_loss"] = kl_loss.detach()
            ent_mean = aggregate(ent, mask, opts.loss_agg, normalizer=normalizer)
            if opts.entropy_coef > 0:
                loss = loss - opts.entropy_coef * ent_mean
            stats |= self._token_sums(mb, logp, ent)
            if inject_nan:
                loss = loss * float("nan")  # fault injection (tests of the guard)
            self.engine.backward(loss * scale)
            self.engine.step()
            n_micro += 1
            for k, v in stats.items():
                # Losses aggregated with the global normaliser add up across
                # micro-batches; ratio-like stats are averaged.
                val = float(v)
                sums[k] = sums.get(k, 0.0) + val
        out = {k: (v if k in ADDITIVE_STATS else v / n_micro) for k, v in sums.items()}
        gn = self.engine.get_global_grad_norm()
        out["grad_norm"] = float(gn) if gn is not None else float("nan")
        out["lr"] = lr_used
        # ZeRO skips the optimizer step itself when the gradient norm is not
        # finite; report whether it did, so the loop can count skips.
        finite = all(math.isfinite(out[k]) for k in ("pg_loss", "kl_loss", "grad_norm") if k in out)
        out["skipped"] = float(not (self.engine.was_step_applied() and finite))
        return out

    # ── weights out ───────────────────────────────────────────────────────
    def _sync_params(self) -> list[tuple[str, Any]]:
        """(name, parameter) of what a weight sync sends: every parameter, or with LoRA the adapter's alone.

        Names are what the engines load: the HF model's, or the adapter's
        wire names (ttrl.rollout.lora). Every weight path, the plan, the
        finiteness check and the fingerprint go by this list.
        """
        if self.lora is not None:
            from ttrl.trainer.lora import adapter_params

            return adapter_params(self.engine.module)
        return list(self.engine.module.named_parameters())

    def _full_named_params(self, dtype=None, params: list | None = None) -> Iterator[tuple[str, Any]]:
        """Full (gathered) parameters one at a time (all, or `params`); every rank must iterate."""
        import deepspeed

        zero3 = self.spec["zero_stage"] == 3
        for name, p in (self.engine.module.named_parameters() if params is None else params):
            if zero3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    t = p.data.detach().to("cpu", dtype=dtype).clone() if self.rank == 0 else None
            else:
                t = p.data.detach().to("cpu", dtype=dtype) if self.rank == 0 else None
            yield name, t

    def _bucket_plan(self, dtype: str, bucket_mb: int) -> tuple[list, list[dict]]:
        """The bucket plan of every weight path (and its wire form) for the engines' `dtype`.

        Made once per (dtype, bucket size): names and full shapes do not change during a run.
        """
        from ttrl.rollout.nccl_sync import param_specs, plan_buckets, plan_to_wire

        key = (dtype, bucket_mb)
        if getattr(self, "_bucket_plan_key", None) != key:
            plan = plan_buckets(param_specs(self._sync_params(), dtype), bucket_mb << 20)
            self._bucket_plan_cached, self._bucket_plan_key = (plan, plan_to_wire(plan)), key
        return self._bucket_plan_cached

    def push_weights(self, engines: list, version: int, dtype: str, bucket_mb: int = 256) -> dict[str, float]:
        """Gather the policy and load it into every rollout engine (rank 0 sends).

        The Ray path: rank 0 packs the weights, cast to the engines' `dtype`,
        into buckets (the NCCL path's plan) and puts each in the object
        store once; every engine reads them there in place. A dead or stalled
        engine -> EngineSyncError (the driver restarts and re-syncs).
        """
        import ray

        from ttrl.rollout.nccl_sync import iter_store_buckets, to_dtype

        t0 = time.perf_counter()
        wire = to_dtype(dtype)
        on_cpu = next(self.engine.module.parameters()).device.type == "cpu"
        # On CPU the packing casts (one copy); from a GPU cast there, then copy the smaller tensor out.
        named = ((n, t) for n, t in self._full_named_params(dtype=None if on_cpu else wire, params=self._sync_params())
                 if t is not None)
        if self.rank != 0:
            for _ in named:  # take part in every gather
                pass
            return {}
        plan, plan_wire = self._bucket_plan(dtype, bucket_mb)
        refs = []
        try:
            for arr in iter_store_buckets(plan, named):  # refuses NaN/inf here, not per engine
                refs.append(ray.put(arr))
                del arr
        except BaseException:
            for _ in named:  # finish every gather: the other ranks wait in them
                pass
            raise
        gather_s = time.perf_counter() - t0
        # One copy in the object store, read by every engine: the refs travel
        # inside a list, so Ray passes them as refs, not as the bytes.
        results = _engines_get([e.load_store_weights.remote(refs, version, plan_wire) for e in engines])
        del refs
        total = time.perf_counter() - t0
        return {"gather_s": gather_s, "total_s": total, "bytes": results[0]["bytes"],
                "engine_load_s": max(r["load_s"] for r in results)}

    # ── weights out, GPU path (NCCL) ──────────────────────────────────────
    def _gathered_by_layer(self, keep: bool | None = None) -> Iterator[tuple[str, Any]]:
        """Full parameters, where they live, one layer gathered at a time; every rank must iterate.

        Tensors are yielded to rank 0 (or to every rank with `keep`), None elsewhere.
        """
        import contextlib

        import deepspeed

        from ttrl.rollout.nccl_sync import layer_groups

        params = dict(self._sync_params())
        zero3 = self.spec["zero_stage"] == 3
        keep = self.rank == 0 if keep is None else keep
        for names in layer_groups(list(params)):
            group = [params[n] for n in names]
            # One all-gather per decoder layer, released as the generator moves
            # on (the sender has copied the layer into a bucket by then).
            gather = (deepspeed.zero.GatheredParameters(group, modifier_rank=None) if zero3
                      else contextlib.nullcontext())
            with gather:
                for n, p in zip(names, group, strict=True):
                    yield n, (p.data if keep else None)

    def _params_finite(self) -> bool:
        """Each rank checks what it holds (its ZeRO-3 shard, or the full tensor); one all-reduce."""
        import torch
        import torch.distributed as dist

        from ttrl.rollout.nccl_sync import all_finite

        held = []
        for _, p in self._sync_params():
            t = getattr(p, "ds_tensor", None)
            t = p.data if t is None else t
            if t.numel() and t.is_floating_point():
                held.append(t)
        ok = torch.tensor([float(all_finite(held))], device="cuda" if self.device == "cuda" else "cpu")
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def init_weight_group(self, engines: list, dtype: str, bucket_mb: int = 256) -> dict:
        """(Re)open the NCCL weight group: this rank 0 + every engine worker; check the plan once."""
        if self.rank != 0:
            return {}
        import ray

        from ttrl.rollout.nccl_sync import (
            NcclWeightSender,
            check_distinct_gpus,
            gpu_uuid,
            rank_offsets,
        )

        if getattr(self, "_sender", None) is not None:
            self._sender.close()  # a group cannot take in a restarted engine: build a new one
        # Names, full shapes and the engine dtype fix the plan: make it once and
        # let every engine refuse it before any byte moves.
        self._plan, self._plan_wire = self._bucket_plan(dtype, bucket_mb)
        ray.get([e.check_weight_plan.remote(self._plan_wire) for e in engines])
        uuids = ray.get([e.device_uuids.remote() for e in engines])  # [engine][worker]
        check_distinct_gpus(gpu_uuid(), [u for us in uuids for u in us])
        offsets, world = rank_offsets([len(us) for us in uuids])
        addr, port = self.node_address()
        joins = [e.init_weight_group.remote(addr, port, off, world) for e, off in zip(engines, offsets, strict=True)]
        self._sender = NcclWeightSender.open(addr, port, world)  # returns once every rank has joined
        ray.get(joins)
        return {"world_size": world, "buckets": len(self._plan)}

    def push_weights_nccl(self, engines: list, version: int, timeout_s: float | None = None) -> dict[str, float]:
        """Gather layer by layer, broadcast bucket by bucket to every engine worker (rank 0 sends).

        Past `timeout_s` the round is given up (the group aborted here; each
        engine gives up by the same deadline) with WeightSyncTimeout.
        """
        import ray

        t0 = time.perf_counter()
        if not self._params_finite():  # every rank gets the same answer: all refuse together
            raise RuntimeError("weight sync: the policy holds NaN or inf; refusing to send it to the engines")
        named = self._gathered_by_layer()
        if self.rank != 0:
            for _ in named:  # take part in every gather
                pass
            return {}
        loads = [e.receive_weights_nccl.remote(self._plan_wire, version, timeout_s) for e in engines]

        def engine_failed() -> None:
            # An engine's call returns only after the last bucket: one that is
            # done early has failed, and NCCL would wait for it forever.
            done, _ = ray.wait(loads, num_returns=len(loads), timeout=0)
            _engines_get(done)

        try:
            stats = self._sender.send(self._plan, named, poll=engine_failed, timeout_s=timeout_s)
        except BaseException:
            for _ in named:  # finish every gather: the other ranks wait in them
                pass
            raise
        results = _engines_get(loads)
        if stats.nonfinite:
            raise RuntimeError(f"weight sync: {len(stats.nonfinite)} tensor(s) overflowed in the cast to the "
                               f"engine dtype, e.g. {list(stats.nonfinite[:3])}")
        return {**stats.as_dict(), "total_s": time.perf_counter() - t0,
                "engine_load_s": max(r["load_s"] for r in results)}

    # ── weights out, colocated path (buckets by handle) ───────────────────
    def _local_device(self) -> Any:
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")

    def probe_shared(self, engines: list) -> str | None:
        """Can engine `rank` (on this rank's device) map this rank's memory? None if so, else why not."""
        if self.rank >= len(engines):
            return None
        import ray

        from ttrl.rollout.ipc import SharedBuffer, checksum, probe_pattern

        pattern = probe_pattern(4096, self.rank)
        with SharedBuffer(pattern.numel(), self._local_device()) as buf:
            buf.tensor.copy_(pattern)
            if buf.device.type == "cuda":
                import torch

                torch.cuda.current_stream().synchronize()
            try:
                got = ray.get(engines[self.rank].probe_shared.remote(buf.handle()), timeout=120)
            except Exception as err:  # noqa: BLE001 - reported, the caller decides
                first = (str(getattr(err, "cause", None) or err).strip().splitlines() or [type(err).__name__])[-1]
                return f"engine {self.rank} could not open trainer rank {self.rank}'s buffer ({first[:200]})"
        if got != checksum(pattern):
            return f"engine {self.rank} read other bytes than trainer rank {self.rank} wrote"
        return None

    def push_weights_shared(self, engines: list, version: int, dtype: str, bucket_mb: int = 256,
                            timeout_s: float | None = None) -> dict[str, float]:
        """Colocated path: rank i hands engine i every bucket by handle (ipc.py); other ranks only gather.

        Every rank holds full parameters as the plan walks the model (ZeRO-3
        gathers a layer to all ranks at once), so each rank feeds its own
        engine with no traffic between ranks. One bucket is loaded while the
        next is packed. A dead engine -> EngineSyncError; one that has not
        loaded a bucket by the round's deadline is killed (Ray restarts it)
        -> WeightSyncTimeout; either way the driver re-syncs it.
        """
        import ray
        import torch

        from ttrl.rollout.ipc import SharedBuffer
        from ttrl.rollout.nccl_sync import (
            WeightSyncTimeout,
            _all_finite,
            _in_plan_order,
            pack_into,
            slot_view,
            to_dtype,
        )

        t0 = time.perf_counter()
        if not self._params_finite():  # every rank gets the same answer: all refuse together
            raise RuntimeError("weight sync: the policy holds NaN or inf; refusing to send it to the engines")
        check_s = time.perf_counter() - t0
        engine = engines[self.rank] if self.rank < len(engines) else None
        named = self._gathered_by_layer(keep=engine is not None)
        if engine is None:
            for _ in named:  # take part in every gather
                pass
            return {}
        plan, plan_wire = self._bucket_plan(dtype, bucket_mb)
        device = self._local_device()
        # Only a cast to float16 can overflow a finite weight.
        check_cast = to_dtype(dtype) == torch.float16
        deadline: float | None = None  # set once the engine has begun the round (see below)
        killed = False

        def wait(ref: Any) -> Any:
            nonlocal killed
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait([ref], timeout=left)
            if not done:
                ray.kill(engine, no_restart=False)  # stalled: Ray restarts it, the driver re-syncs it
                killed = True
                raise WeightSyncTimeout(f"weight sync: rollout engine {self.rank} did not finish loading within "
                                        f"rollout.sync_timeout_s={timeout_s:g}s; restarting it")
            return _engines_get([ref])[0]

        begun = False
        live: list[SharedBuffer] = []  # packed or being packed, not yet known to be loaded
        pending: Any = None  # the engine's call loading live[0]
        pack_s = wait_s = 0.0
        try:
            t_begin = time.perf_counter()
            # No deadline for the start: with rollout.overlap the call queues behind the engine's
            # generation of the next step, which is not a stall. A dead engine still ends the wait.
            wait(engine.begin_shared_sync.remote(plan_wire))
            begun = True
            begin_s = time.perf_counter() - t_begin
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            slots = _in_plan_order(plan, named)
            for k, bucket in enumerate(plan):
                t_pack = time.perf_counter()
                buf = SharedBuffer(bucket.nbytes, device)
                live.append(buf)
                for _ in bucket.slots:
                    s, t = next(slots)
                    pack_into(buf.tensor, s, t)  # casts to the engine dtype
                    if check_cast and t.is_floating_point() and not _all_finite(slot_view(buf.tensor, s)):
                        raise ValueError(f"weight sync: {s.name} overflows in the cast to {dtype}; "
                                         "refusing to send it to the engines")
                if device.type == "cuda":
                    torch.cuda.current_stream().synchronize()  # packed before the engine reads it
                ref = engine.load_shared_bucket.remote(k, buf.handle())
                t_wait = time.perf_counter()
                pack_s += t_wait - t_pack
                if pending is not None:  # the bucket before this one
                    wait(pending)
                    live.pop(0).close()
                pending = ref
                wait_s += time.perf_counter() - t_wait
            next(slots, None)  # refuses a tensor the plan does not have
            if pending is not None:
                t_wait = time.perf_counter()
                wait(pending)
                live.pop(0).close()
                pending = None
                wait_s += time.perf_counter() - t_wait
            gather_s = time.perf_counter() - t0
            begun = False
            res = wait(engine.end_shared_sync.remote(version))
        except BaseException:
            for _ in named:  # finish every gather: the other ranks wait in them
                pass
            if begun and not killed:
                # Put the engine's model back together; its version stays the old one, so it is
                # re-synced (layers that got part of their tensors are not whole until then).
                try:
                    ray.get(engine.end_shared_sync.remote(None), timeout=60)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
            for b in live:
                b.close()
            raise
        # gather_s: until the last bucket is loaded; of it pack_s gathering and packing, wait_s waiting
        # for the engine (each bucket but the last is loaded while the next one is packed).
        return {"gather_s": gather_s, "check_s": check_s, "begin_s": begin_s, "pack_s": pack_s, "wait_s": wait_s,
                "total_s": time.perf_counter() - t0,
                "bytes": res["bytes"], "engine_load_s": res["load_s"], "buckets": float(len(plan))}

    def fingerprint(self) -> float | None:
        """Sum of |w| over all parameters: a cheap "did the weights move" check (rank 0 returns it).

        Each rank sums what it holds where it holds it (its ZeRO-3 shard, or
        under ZeRO-1/2 the full tensors, summed by rank 0 alone), in float64
        one tensor at a time, then one all-reduce: nothing is gathered or
        copied to the CPU, so it costs a read of the shard, not of the model.
        """
        import torch
        import torch.distributed as dist

        zero3 = self.spec["zero_stage"] == 3
        if not zero3 and self.rank != 0:
            return None
        params = [p for _, p in self._sync_params()]  # with LoRA the adapter: all that trains
        device = params[0].device if params else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
        for p in params:
            t = getattr(p, "ds_tensor", None) if zero3 else None
            t = p.data if t is None else t
            if t.numel():
                total += t.double().abs().sum().to(total.device)
        if zero3:
            dist.all_reduce(total)
        return float(total) if self.rank == 0 else None

    def sync_state(self) -> dict[str, Any] | None:
        """What a weight sync sends, gathered, as CPU tensors by name (rank 0; tests and checks)."""
        out = {n: t.clone() for n, t in self._full_named_params(params=self._sync_params()) if t is not None}
        return out if self.rank == 0 else None

    def save_hf(self, path: str, tokenizer_path: str) -> str | None:
        """Export the policy as a Hugging Face model dir, or with LoRA as a peft adapter dir (rank 0 writes)."""
        if self.lora is not None:
            from ttrl.rollout.lora import write_adapter

            tensors = {n: t for n, t in self._full_named_params(params=self._sync_params()) if t is not None}
            if self.rank != 0:
                return None
            write_adapter(path, tensors, self.lora, self.spec.get("base_path"))
            return path
        sd = {n: t for n, t in self._full_named_params() if t is not None}
        if self.rank != 0:
            return None
        from transformers import AutoTokenizer

        module = self.engine.module
        module.save_pretrained(path, state_dict=sd, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
        return path

    def save_state(self, path: str, tag: str) -> None:
        """Optimizer, scheduler and sharded weights (collective) for resuming; with LoRA, of the adapter alone."""
        self._save_state(path, tag)

    def load_state(self, path: str, tag: str) -> None:
        self._load_state(path, tag)


class CriticWorker(_DSWorker):
    """The PPO value model on one rank: the policy's backbone with a scalar head."""

    def setup(self, master_addr: str, master_port: int, model_path: str, total_opt_steps: int) -> dict:
        t0 = time.perf_counter()
        self._init_dist(master_addr, master_port)
        from transformers import AutoModelForTokenClassification

        s = self.spec
        ds = self._ds_config(train=True, lr=s["critic_lr"])

        def load():
            # num_labels=1: one value per token; the head starts random.
            return AutoModelForTokenClassification.from_pretrained(model_path, num_labels=1,
                                                                   torch_dtype=self.torch_dtype)

        model = self._load(load, ds)
        model.config.use_cache = False
        # With LoRA the critic gets adapters of its own (and a trainable value head), from the same base.
        model = self._with_adapter(model, task_type="TOKEN_CLS", modules_to_save=["score"])
        self.engine = self._wrap(model, ds, train=True, total_opt_steps=total_opt_steps)
        return self._times(t0)

    def _values(self, batch: dict):
        from ttrl.trainer.batch import response_slice

        out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"])
        # The value of the state before response token t sits where token t is predicted.
        return out.logits[:, response_slice(batch), 0].float()

    def compute_values(self, batch: dict) -> Any:
        import torch

        self.engine.eval()
        parts = []
        with torch.no_grad():
            for rows, mb in self._micro_batches(batch, no_grad=True):
                parts.append((rows, self._values(self._to_dev(mb))))
        return self._scatter_rows(parts, batch)

    def train_step(self, batch: dict, normalizer: float, opts: UpdateOptions) -> dict[str, float]:
        from ttrl.algos import value_loss
        from ttrl.trainer.batch import batch_size

        self.engine.train()
        _check_rows(batch_size(batch), self.spec["grad_accum"], self.spec["micro_batch_size"])
        scale = self.spec["grad_accum"] * self.world_size
        total, clip, n = 0.0, 0.0, 0
        for _, mb in self._micro_batches(batch):
            mb = self._to_dev(mb)
            v = self._values(mb)
            loss, stats = value_loss(v, mb["values"], mb["returns"], mb["response_mask"],
                                     clip_eps=opts.value_clip, agg_mode="token_mean", normalizer=normalizer)
            self.engine.backward(loss * scale)
            self.engine.step()
            total += float(loss)
            clip += float(stats["vf_clip_frac"])
            n += 1
        gn = self.engine.get_global_grad_norm()
        return {"vf_loss": total, "vf_clip_frac": clip / max(n, 1),
                "critic_grad_norm": float(gn) if gn is not None else float("nan")}

    def save_state(self, path: str, tag: str) -> None:
        self._save_state(path, tag)

    def load_state(self, path: str, tag: str) -> None:
        self._load_state(path, tag)

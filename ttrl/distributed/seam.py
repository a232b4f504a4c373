"""The seam between a step and the actors: `StepRuntime`, what a step and the run ask of them.

`ttrl.step` and the run's parts (guard, checkpoints, evaluation) talk to
the rollout engines and trainer ranks only through these members. Two
classes implement them: `ttrl.distributed.runtime.Runtime` (training and
the bench: every engine is a rollout engine) and
`ttrl.serve.learner.StagingRuntime` (`ttrl-serve`'s learner: rollouts and
syncs on the staging engine only, the trainer shared with the server).
tests/unit/distributed/test_seam.py checks that both have every member, with the same
parameters. This module holds the protocol only: it must never import
ray, vllm, deepspeed or torch at run time, nor start anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ttrl.trainer.batch import Batch
    from ttrl.trainer.options import UpdateOptions


@runtime_checkable
class StepRuntime(Protocol):
    # A reference model is loaded (KL on), a critic is trained (PPO).
    need_ref: bool
    need_critic: bool
    # Rows per optimizer step (trainer.mini_batch_size, or the whole step batch).
    mini: int
    # How many times weights were pushed into the engines: what they hold.
    weights_version: int

    # ── rollout ───────────────────────────────────────────────────────────
    def submit_generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, top_k: int,
                        max_tokens: int, seed: int | None = None) -> Any:
        """Start sampling n completions per prompt; returns a handle for `collect`, at once."""
        ...

    def collect(self, handle: Any) -> list[list[dict]]:
        """Wait for a `submit_generate`: [prompt][n] dicts (text, token_ids, logprobs, finish_reason)."""
        ...

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, top_k: int,
                 max_tokens: int, seed: int | None = None) -> list[list[dict]]:
        """`collect(submit_generate(...))`."""
        ...

    def sleep_engines(self) -> None:
        """Free the engines' KV cache while the trainer needs the GPU memory."""
        ...

    def wake_engines(self, tags: list[str] | None = None) -> None:
        """Reallocate what sleep freed: "weights" or "kv_cache" alone, or (None) both."""
        ...

    # ── trainer ───────────────────────────────────────────────────────────
    def logprobs(self, batch: Batch, temperature: float, which: str = "policy") -> torch.Tensor:
        """Log-probs [B, R] of the response tokens under the policy (or `which="ref"`)."""
        ...

    def token_stats(self, batch: Batch, temperature: float) -> dict[str, torch.Tensor]:
        """Per response token [B, R] under the policy: "entropy" and "self_certainty" (KL(uniform || p))."""
        ...

    def values(self, batch: Batch) -> torch.Tensor:
        """Critic values [B, R]."""
        ...

    def train_policy(self, batch: Batch, opts: UpdateOptions, inject_nan: bool = False) -> dict[str, float]:
        """The policy update on one step's batch (mini-batches x epochs); stats averaged over them."""
        ...

    def train_critic(self, batch: Batch, opts: UpdateOptions) -> dict[str, float]:
        ...

    def sync_weights(self) -> dict[str, float]:
        """Policy -> the engines this runtime samples from."""
        ...

    # ── state ─────────────────────────────────────────────────────────────
    def save(self, path: str, export_hf: bool = True) -> None:
        ...

    def load(self, path: str) -> None:
        """Trainer state (weights, optimizer, schedule) from `path`; the engines need a `sync_weights`."""
        ...

    def fingerprint(self) -> float:
        """Sum of |w| of the policy: did a resume restore the weights."""
        ...

    def scale_lr(self, factor: float) -> float:
        """Multiply the learning rate (and the schedule's peak); returns the new lr."""
        ...

    def shutdown(self) -> None:
        """Let go of what this runtime owns."""
        ...


__all__ = ["StepRuntime"]

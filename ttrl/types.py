"""The data that flows through a step: prompts, samples and groups of samples.

A `Prompt` carries its ground-truth answer only so that metrics can grade
label quality. Label-free code (labeling/, rewards/ in a label-free run) is
handed `Prompt.scrubbed()` copies, whose answer is None, so that it cannot
peek even by accident. Nothing here imports torch, ray or vllm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prompt:
    """One unlabeled problem. `answer` is the hidden ground truth (metrics only)."""

    id: str
    problem: str
    answer: str | None = None
    # The text fed to the engine after the model's template was applied.
    text: str = ""
    # A second view of the problem (same answer), templated: for co_reward and self_harmony only, else "".
    view_text: str = ""

    def scrubbed(self) -> Prompt:
        """A copy with the ground-truth answer removed."""
        return dataclasses.replace(self, answer=None)


@dataclass
class Sample:
    """One completion of a prompt, as the rollout engine returned it."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    # Log-probs of `token_ids` under the engine's weights at sampling time.
    logprobs: list[float] = field(default_factory=list)
    # The extracted final answer, by label.extractor (None when there is none, e.g. no \\boxed{}).
    answer: str | None = None
    finish_reason: str | None = None


@dataclass
class Group:
    """All samples drawn for one prompt (n_votes of them)."""

    prompt: Prompt
    prompt_token_ids: list[int]
    samples: list[Sample]
    # Samples of the prompt's second view (`Prompt.view_text`), when the reward votes on one.
    view_samples: list[Sample] | None = None

    def answers(self) -> list[str | None]:
        return [s.answer for s in self.samples]

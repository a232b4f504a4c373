"""Which prompts each step trains on: epochs of (optionally shuffled) batches.

Its state (epoch, position) is two integers so a checkpoint can resume the
exact sequence of batches.
"""

from __future__ import annotations

import random


class PromptSampler:
    def __init__(self, num_prompts: int, batch_size: int, shuffle: bool, seed: int):
        if num_prompts < 1:
            raise ValueError("no prompts to sample from")
        self.n, self.batch_size, self.shuffle, self.seed = num_prompts, batch_size, shuffle, seed
        self.epoch, self.pos = 0, 0

    def steps_per_epoch(self) -> int:
        return max(1, self.n // self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[int]:
        """The next batch of prompt indices (a short tail is dropped; small sets wrap)."""
        if self.pos + self.batch_size > self.n and self.pos > 0:
            self.epoch, self.pos = self.epoch + 1, 0
        order = self._order(self.epoch)
        idx = [order[(self.pos + i) % self.n] for i in range(self.batch_size)]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

"""Fake reward functions for integration tests (TRL-style signatures).

A random tiny model never writes \\boxed{}, so majority-vote rewards would
all be zero and nothing would train; these give a reward that varies across
samples so that advantages, and therefore updates, are non-zero.
"""


def digit_share(prompts, completions, **kwargs):
    """Share of a completion's characters that are digits."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]

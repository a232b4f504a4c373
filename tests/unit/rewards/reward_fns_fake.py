"""User reward functions for test_rewards.py, loaded by dotted path like a user's own."""

CALLS: list[dict] = []  # the keyword arguments of each call, for inspection
NOT_CALLABLE = 3


def length(prompts, completions, **kwargs):
    CALLS.append({"prompts": prompts, "completions": completions, **kwargs})
    return [float(len(c)) for c in completions]


def none_without_answer(prompts, completions, answers, **kwargs):
    return [None if a is None else 1.0 for a in answers]


def exact_match(prompts, completions, answers, ground_truth, **kwargs):
    return [1.0 if a == t else 0.0 for a, t in zip(answers, ground_truth, strict=True)]


def too_few(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def not_a_list(prompts, completions, **kwargs):
    return 1.0


def nan_reward(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def strict_signature(prompts, completions):
    return [0.0] * len(completions)


class Scorers:
    @staticmethod
    def zero(prompts, completions, **kwargs):
        return [0.0] * len(completions)


def raises(prompts, completions, **kwargs):
    raise ZeroDivisionError("division by zero in the user's scorer")

"""Label-quality metrics: the only code of a step that looks at ground truth.

Given the votes and rewards a label-free step produced, it grades them
against the true answers: are the pseudo-labels right (`label/accuracy`),
do the rewards equal the rewards ground truth would have given
(`reward/accuracy`), and how often is a single sample right
(`train/pass@1`). Answers are graded as the run's extractor reads them
(`extractor`, label.extractor), as the vote compared them. Nothing it
computes flows back into training.
"""

from __future__ import annotations

from collections.abc import Sequence

from ttrl.labeling.grade import is_equivalent
from ttrl.labeling.vote import Vote
from ttrl.types import Group


def label_quality(groups: Sequence[Group], votes: Sequence[Vote], rewards: Sequence[Sequence[float]],
                  train_rows: Sequence[Sequence[int]], extractor: str = "boxed") -> dict[str, float]:
    """Metrics over all n_votes samples of every prompt (rewards on the kept rows)."""
    label_right, ratios, correct, reward_match, reward_total, extract_fail, n_samples = 0, [], 0, 0, 0, 0, 0
    graded = 0
    for g, vote, r, rows in zip(groups, votes, rewards, train_rows):
        gt = g.prompt.answer
        ratios.append(vote.ratio)
        answers = g.answers()
        extract_fail += sum(a is None for a in answers)
        n_samples += len(answers)
        if gt is None:
            continue
        graded += 1
        # Grade each equivalence class once, not each sample.
        class_ok = {c: is_equivalent(rep, gt, extractor) for c, rep in enumerate(vote.counts)}
        ok = [a is not None and vote.assignment[i] is not None and class_ok[vote.assignment[i]]
              for i, a in enumerate(answers)]
        correct += sum(ok)
        label_right += int(vote.label is not None and vote.winner is not None and class_ok[vote.winner])
        for j, i in enumerate(rows):
            reward_match += int((r[j] > 0.5) == ok[i])
            reward_total += 1
    out = {
        "label/majority_ratio": sum(ratios) / max(len(ratios), 1),
        "label/extract_fail_rate": extract_fail / max(n_samples, 1),
    }
    if graded:
        out.update({
            "label/accuracy": label_right / graded,
            "train/pass@1": correct / max(sum(len(g.samples) for g in groups if g.prompt.answer is not None), 1),
            "reward/accuracy": reward_match / max(reward_total, 1),
        })
    return out

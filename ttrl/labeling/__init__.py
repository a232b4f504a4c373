"""Labeling without labels: extract answers, grade equivalence, vote.

extract.py pulls the final answer out of a completion (by answer type:
boxed, choice, number, custom), grade.py decides whether two answers are
equivalent (match.py for letters and numbers, math-verify bounded in time
for the rest), vote.py turns a prompt's answers into a majority-vote
pseudo-label. Nothing here
sees a ground-truth answer unless a caller passes one as `ref`, and nothing
here imports torch, ray, vllm or deepspeed.
"""

from ttrl.labeling.extract import extract_answer
from ttrl.labeling.grade import equivalence_classes, is_equivalent
from ttrl.labeling.vote import Vote, majority_vote, majority_votes

__all__ = [
    "Vote",
    "equivalence_classes",
    "extract_answer",
    "is_equivalent",
    "majority_vote",
    "majority_votes",
]

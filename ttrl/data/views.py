"""Second views of a problem: the same question asked another way, with the same answer.

Co-rewarding (arXiv 2508.00410) guards a self-rewarding run against
agreeing with itself on a wrong answer by letting a second view of each
question supply the vote: a mistake the model makes reading one phrasing is
less likely to be the one it makes reading another. A view is a function
`problem -> problem` registered here by name (`reward.view`), or a user's
function named by a dotted path ("package.module:function", e.g. one that
looks up paraphrases written offline).

- `reorder_terms`: a sum or product of plain numbers ("37+48+12=") with its
  terms rotated by one ("48+12+37="). The answer is unchanged, and the
  model must carry in a different order, which is where the demo's model
  makes its mistakes. Any other problem is an error naming it.

A view reads the problem text only, never the answer. Must never call a
model or touch the network.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ttrl.registry import Registry

__all__ = ["VIEWS", "load_view", "reorder_terms"]

View = Callable[[str], str]
VIEWS: Registry[View] = Registry("problem view")

# Two or more unsigned integers joined by one operator, then "=": what the demo task writes.
_EXPRESSION = re.compile(r"\s*(\d+(?:\s*([+*])\s*\d+)+)\s*=\s*")


@VIEWS.register("reorder_terms")
def reorder_terms(problem: str) -> str:
    """'37+48+12=' -> '48+12+37=': the terms rotated by one; ValueError for anything else."""
    m = _EXPRESSION.fullmatch(problem)
    if m is None or len(set(re.findall(r"[+*]", m.group(1)))) != 1:
        raise ValueError(f"view reorder_terms reads sums or products of plain numbers like '37+48+12=', "
                         f"not {problem[:80]!r}")
    op = m.group(2)
    terms = [t.strip() for t in m.group(1).split(op)]
    return op.join(terms[1:] + terms[:1]) + "="


def load_view(name: str) -> View:
    """A registered view by name, or a user's function by dotted path ('package.module:function')."""
    if name in VIEWS:
        return VIEWS.get(name)
    if ":" not in name and "." not in name:
        raise ValueError(f"reward.view={name!r} is not a registered view ({', '.join(VIEWS.names())}) "
                         f"nor a function path 'package.module:function'")
    from ttrl.rewards.custom import load_function

    try:
        return load_function(name)
    except ValueError as err:
        raise ValueError(f"reward.view: {err}".replace("reward function", "view function")) from None

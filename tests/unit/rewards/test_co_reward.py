"""co_reward and the second views it votes on: hand-worked votes, views, and the errors that name the prompt."""

import pytest
from omegaconf import OmegaConf

from ttrl.data.views import load_view, reorder_terms
from ttrl.parts import with_views
from ttrl.rewards import build_reward, compute_rewards
from ttrl.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit


def group(pid: str, own: list[str | None], view: list[str | None] | None) -> Group:
    def samples(answers):
        return [Sample(text=f"\\boxed{{{a}}}" if a else "?", answer=a) for a in answers]

    return Group(Prompt(pid, f"problem {pid}", answer="6"), [], samples(own),
                 view_samples=None if view is None else samples(view))


# ── views ──────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(("problem", "view"), [("37+48+12=", "48+12+37="), ("3*4=", "4*3="),
                                               (" 10 + 20 + 30 = ", "20+30+10=")])
def test_reorder_terms_rotates_the_terms(problem: str, view: str) -> None:
    assert reorder_terms(problem) == view
    assert eval(view[:-1]) == eval(problem.strip()[:-1])  # the same answer, by construction


@pytest.mark.parametrize("problem", ["2+3*4=", "x+1=", "12=", "What is 3+4?", "3+4"])
def test_reorder_terms_refuses_what_it_cannot_reorder(problem: str) -> None:
    with pytest.raises(ValueError, match="reorder_terms reads sums or products"):
        reorder_terms(problem)


def test_views_load_by_name_or_path_and_bad_ones_are_named() -> None:
    assert load_view("reorder_terms") is reorder_terms
    assert load_view("ttrl.data.views:reorder_terms") is reorder_terms
    with pytest.raises(ValueError, match="reward.view='reorder' is not a registered view"):
        load_view("reorder")
    with pytest.raises(ValueError, match="no_such_module"):
        load_view("no_such_module:fn")


def test_with_views_templates_each_view_and_names_the_prompt_it_fails_on() -> None:
    cfg = OmegaConf.create({"reward": {"view": "reorder_terms"},
                            "model": {"template": "plain", "prompt_template": "Q: {problem}"}})
    prompts = [Prompt("a", "1+2+3=", "6", "Q: 1+2+3="), Prompt("b", "40+2=", "42", "Q: 40+2=")]
    out = with_views(prompts, cfg, tokenizer=None)
    assert [p.view_text for p in out] == ["Q: 2+3+1=", "Q: 2+40="]
    assert [p.text for p in out] == ["Q: 1+2+3=", "Q: 40+2="] and out[0].answer == "6"
    with pytest.raises(ValueError, match=r"reward.view='reorder_terms' failed on prompt 'c'"):
        with_views([*prompts, Prompt("c", "a+b=", None, "Q: a+b=")], cfg, tokenizer=None)


# ── co_reward ──────────────────────────────────────────────────────────────
def test_co_reward_pays_agreement_with_the_second_views_vote() -> None:
    groups = [group("p0", ["5", "5", "6", "7"], ["6", "6", "5", "6"]),  # own majority 5, the view says 6
              group("p1", ["1", "2"], ["3", "3"]),                       # the view's answer nobody gave
              group("p2", ["4", "4"], [None, None])]                     # the view answered nothing
    out = compute_rewards(build_reward("co_reward"), groups)
    assert out.rewards == [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    v0, v1, v2 = out.votes
    # The vote the metrics see: the view's label over the trained samples' classes.
    assert (v0.label, v0.ratio, v0.counts) == ("6", 0.25, {"5": 2, "6": 1, "7": 1})
    assert [v0.agrees(i) for i in range(4)] == [False, False, True, False]
    assert (v1.label, v1.ratio, v1.counts, v1.assignment) == ("3", 0.0, {"1": 1, "2": 1, "3": 0}, [0, 1])
    assert (v2.label, v2.winner, v2.ratio) == (None, None, 0.0)


def test_co_reward_matches_answers_by_equivalence_and_silences_weak_view_votes() -> None:
    groups = [group("p0", ["0.5", "1/3"], ["1/2", "\\frac{1}{2}", "2"])]
    assert compute_rewards(build_reward("co_reward"), groups).rewards == [[1.0, 0.0]]
    weak = [group("p0", ["6", "6"], ["6", "7", "8", "9"])]  # the view's winner holds 1 of 4
    assert compute_rewards(build_reward("co_reward", min_ratio=0.3), weak).rewards == [[0.0, 0.0]]
    assert compute_rewards(build_reward("co_reward", min_ratio=0.25), weak).rewards == [[1.0, 1.0]]


def test_co_reward_needs_the_second_views_samples() -> None:
    with pytest.raises(ValueError, match="needs the second view's samples"):
        compute_rewards(build_reward("co_reward"), [group("p0", ["1"], None)])
    assert build_reward("co_reward").needs_ground_truth is False

"""select_pairs: strategies, tie-breaks, margins, ties and unscored completions."""

import math
import random

import pytest

from judges.base import Completion, JudgeItem
from orchestrator.pairs.select import select_pairs


def item(texts, logprobs=None, finish=None, prompt="p", row=None):
    logprobs = logprobs or [None] * len(texts)
    finish = finish or ["stop"] * len(texts)
    comps = [Completion(t, f, lp, [ord(ch) for ch in t]) for t, lp, f in zip(texts, logprobs, finish)]
    return JudgeItem(prompt, comps, row or {})


def texts(sel):
    return [(p.chosen, p.rejected) for p in sel.pairs]


def test_best_worst_fills_every_field_of_the_pair():
    it = item(["a", "bb", "ccc"], logprobs=[-1.0, -2.0, -3.0], finish=["stop", "length", "stop"],
              prompt=[{"role": "user", "content": "hi"}], row={"answer": "a"})
    sel = select_pairs([it], [[1.0, 0.0, 0.5]], versions=[7], prompt_token_ids=[[1, 9, 9]])
    (pair,) = sel.pairs
    assert (pair.chosen, pair.rejected) == ("a", "bb")
    assert (pair.chosen_score, pair.rejected_score) == (1.0, 0.0)
    assert pair.prompt == [{"role": "user", "content": "hi"}] and pair.row == {"answer": "a"}
    assert pair.policy_version == 7 and pair.prompt_token_ids == [1, 9, 9] and pair.source == "best_worst"
    assert pair.chosen_token_ids == [97] and pair.rejected_token_ids == [98, 98]
    assert (pair.chosen_finish_reason, pair.rejected_finish_reason) == ("stop", "length")
    assert sel.prompt_index == [0]
    assert sel.dropped == {"tie": 0, "below_margin": 0, "too_few_scored": 0, "aborted": 0}


def test_drop_reasons_are_counted_per_prompt():
    items = [item(["a", "b"]), item(["a", "b", "c"]), item(["a", "b"]), item(["a", "b"]), item(["a", "b"])]
    scores = [
        [1.0, 1.0],               # tie
        [None, 1.0, math.nan],    # one scored
        [0.5, 0.4],               # margin 0.1 < 0.2
        [0.1 + 0.2, 0.3],         # float noise is a tie, not a pair
        [1.0, 0.0],               # a pair
    ]
    sel = select_pairs(items, scores, min_margin=0.2)
    assert sel.dropped == {"tie": 2, "below_margin": 1, "too_few_scored": 1, "aborted": 0}
    assert sel.prompt_index == [4] and texts(sel) == [("a", "b")]


def test_none_nan_inf_and_text_scores_are_excluded():
    it = item(["a", "b", "c", "d", "e"])
    sel = select_pairs([it], [[math.inf, 0.7, -math.inf, "9", 0.2]])
    assert texts(sel) == [("b", "e")]
    assert select_pairs([it], [[None, math.nan, math.inf, 1.0, None]]).dropped["too_few_scored"] == 1


def test_margin_equal_to_min_margin_is_kept():
    sel = select_pairs([item(["a", "b"])], [[1.5, 1.0]], min_margin=0.5)
    assert len(sel.pairs) == 1


def test_logprob_tie_break_picks_the_most_likely_on_both_sides():
    # Worst: b, c, d tied at 0; c is the most likely wrong answer. Best: a and e tied; e more likely.
    it = item(["a", "b", "c", "d", "e"], logprobs=[-5.0, -3.0, -0.5, None, -1.0])
    sel = select_pairs([it], [[1, 0, 0, 0, 1]], tie_break="logprob")
    assert texts(sel) == [("e", "c")]


def test_logprob_tie_break_without_logprobs_takes_the_earliest():
    sel = select_pairs([item(["a", "b", "c", "d"])], [[1, 0, 1, 0]], tie_break="logprob")
    assert texts(sel) == [("a", "b")]


def test_shorter_tie_break():
    it = item(["long right", "ok", "wrong answer", "no"])
    sel = select_pairs([it], [[1, 1, 0, 0]], tie_break="shorter")
    assert texts(sel) == [("ok", "no")]


def test_random_tie_break_uses_the_rng_and_covers_the_candidates():
    it = item(["a", "b", "c", "d"])
    seen = set()
    for seed in range(40):
        sel = select_pairs([it], [[1, 1, 0, 0]], tie_break="random", rng=random.Random(seed))
        seen.update(texts(sel))
    assert seen == {("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")}
    again = [texts(select_pairs([it], [[1, 1, 0, 0]], tie_break="random", rng=random.Random(3)))
             for _ in range(2)]
    assert again[0] == again[1]


def test_best_random_draws_only_from_completions_below_the_margin():
    it = item(["best", "close", "low1", "low2"], logprobs=[-1, -1, -1, -1])
    rejected = set()
    for seed in range(40):
        sel = select_pairs([it], [[1.0, 0.9, 0.2, 0.0]], strategy="best_random", min_margin=0.5,
                           rng=random.Random(seed))
        (pair,) = sel.pairs
        assert pair.chosen == "best"
        rejected.add(pair.rejected)
    assert rejected == {"low1", "low2"}
    sel = select_pairs([it], [[1.0, 0.9, 0.8, 0.7]], strategy="best_random", min_margin=0.5)
    assert sel.dropped["below_margin"] == 1 and not sel.pairs


def test_all_pairs_above_margin_keeps_the_largest_margins_first():
    it = item(["a", "b", "c", "d"])
    sel = select_pairs([it], [[3.0, 2.0, 1.0, 0.0]], strategy="all_pairs_above_margin",
                       min_margin=1.0, max_pairs_per_prompt=4)
    assert [(p.chosen_score, p.rejected_score) for p in sel.pairs] == [(3, 0), (3, 1), (2, 0), (3, 2)]
    assert sel.prompt_index == [0, 0, 0, 0]
    everything = select_pairs([it], [[3.0, 2.0, 1.0, 0.0]], strategy="all_pairs_above_margin",
                              min_margin=1.0, max_pairs_per_prompt=10)
    assert len(everything.pairs) == 6
    assert all(p.chosen_score - p.rejected_score >= 1.0 for p in everything.pairs)


def test_all_pairs_ties_in_margin_follow_the_tie_break():
    # Margins of (a,c), (a,d), (b,c), (b,d) are all 1: hard negatives first, then likely chosen.
    it = item(["a", "b", "c", "d"], logprobs=[-2.0, -1.0, -3.0, -0.5])
    sel = select_pairs([it], [[1, 1, 0, 0]], strategy="all_pairs_above_margin", max_pairs_per_prompt=3)
    assert texts(sel) == [("b", "d"), ("a", "d"), ("b", "c")]
    ties = select_pairs([item(["a", "b"])], [[1, 1]], strategy="all_pairs_above_margin")
    assert ties.dropped["tie"] == 1


def test_all_pairs_with_only_small_gaps_is_below_margin():
    sel = select_pairs([item(["a", "b", "c"])], [[1.0, 0.8, 0.6]], strategy="all_pairs_above_margin",
                       min_margin=0.5)
    assert texts(sel) == [] and sel.dropped["below_margin"] == 1


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="pairs.strategy"):
        select_pairs([], [], strategy="worst_best")
    with pytest.raises(ValueError, match="pairs.tie_break"):
        select_pairs([], [], tie_break="longer")
    with pytest.raises(ValueError, match="2 score lists for 1 items"):
        select_pairs([item(["a", "b"])], [[1, 0], [1, 0]])
    with pytest.raises(ValueError, match="item 0: 3 scores for 2 completions"):
        select_pairs([item(["a", "b"])], [[1, 0, 0]])
    with pytest.raises(ValueError, match="versions"):
        select_pairs([item(["a", "b"])], [[1, 0]], versions=[1, 2])


def test_versions_default_to_zero_and_pairs_follow_items():
    items = [item(["x", "y"]), item(["u", "v"])]
    sel = select_pairs(items, [[0, 1], [1, 0]])
    assert texts(sel) == [("y", "x"), ("u", "v")]
    assert [p.policy_version for p in sel.pairs] == [0, 0]
    assert sel.prompt_index == [0, 1]


def test_aborted_completions_are_never_paired_and_are_counted():
    it = item(["best", "x", "worst"], finish=["abort", "stop", "stop"])
    sel = select_pairs([it], [[9.0, 1.0, 0.0]])
    assert texts(sel) == [("x", "worst")] and sel.dropped["aborted"] == 1
    lone = select_pairs([item(["a", "b"], finish=["abort", "stop"])], [[1.0, 0.0]])
    assert lone.pairs == [] and lone.dropped["aborted"] == 1 and lone.dropped["too_few_scored"] == 1

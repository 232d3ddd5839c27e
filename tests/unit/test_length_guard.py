"""The length guard of pair selection: balance over a run, the ratio cap, and the round's figures."""

import random

from judges.base import Completion, JudgeItem
from orchestrator.pairs.length_guard import LengthGuard, length_stats
from orchestrator.pairs.select import select_pairs
from common.types import PreferencePair


def item(texts, logprobs=None):
    logprobs = logprobs or [-float(k) for k in range(len(texts))]
    return JudgeItem("p", [Completion(t, "stop", lp, [ord(ch) for ch in t]) for t, lp in zip(texts, logprobs)])


# Two right answers (one short and likely, one long) and two wrong ones of middle length.
TIED = item(["aa", "aaaaaa", "bbbb", "cccc"], logprobs=[-1.0, -2.0, -3.0, -4.0])
SCORES = [1.0, 1.0, 0.0, 0.0]


def run(strategy="best_worst", rounds=10, guard=None):
    pairs = []
    for r in range(rounds):
        sel = select_pairs([TIED], [SCORES], strategy=strategy, length_guard=guard, rng=random.Random(r))
        pairs += sel.pairs
    return pairs


def test_without_balance_the_logprob_tie_break_always_picks_the_short_chosen():
    pairs = run()
    assert {p.chosen for p in pairs} == {"aa"}
    assert length_stats(pairs)["longer_chosen_share"] == 0.0


def test_balance_alternates_longer_and_shorter_chosen_over_the_run():
    guard = LengthGuard(balance=True)
    pairs = run(guard=guard)
    assert [p.chosen for p in pairs] == ["aa", "aaaaaa"] * 5  # first: no preference, then the tie-break
    assert length_stats(pairs)["longer_chosen_share"] == 0.5
    assert guard.counts() == {"longer": 5, "shorter": 5}
    # The counts carry over a resume: a guard rebuilt from them goes on where it was.
    resumed = LengthGuard(balance=True, **{"longer": 5, "shorter": 6})
    assert [p.chosen for p in run(rounds=1, guard=resumed)] == ["aaaaaa"]


def test_balance_applies_to_every_strategy():
    for strategy in ("best_random", "all_pairs_above_margin"):
        guard = LengthGuard(balance=True)
        pairs = run(strategy, guard=guard)
        share = length_stats(pairs)["longer_chosen_share"]
        assert 0.4 <= share <= 0.6, (strategy, share)


def test_ratio_cap_prefers_a_tied_candidate_within_it_and_drops_a_prompt_without_one():
    guard = LengthGuard(max_ratio=2.0)
    # "aa" vs "bbbb"/"cccc": ratio 2 fits; "aaaaaa" vs them: 1.5 fits too; prefer logprob then.
    sel = select_pairs([TIED], [SCORES], length_guard=guard)
    assert [(p.chosen, p.rejected) for p in sel.pairs] == [("aa", "bbbb")]
    assert sel.dropped["length_ratio"] == 0
    # Only a long right answer against a short wrong one: ratio 5 > 2, no pair.
    lone = item(["aaaaa", "b"])
    sel = select_pairs([lone, TIED], [[1.0, 0.0], SCORES], length_guard=LengthGuard(max_ratio=2.0))
    assert sel.dropped["length_ratio"] == 1 and len(sel.pairs) == 1 and sel.prompt_index == [1]
    # The likelier right answer breaks the cap, the other one does not: the cap ranks first.
    mixed = item(["a", "aaa", "bbbbb"], logprobs=[-1.0, -5.0, -2.0])
    sel = select_pairs([mixed], [[1.0, 1.0, 0.0]], length_guard=LengthGuard(max_ratio=2.0))
    assert [(p.chosen, p.rejected) for p in sel.pairs] == [("aaa", "bbbbb")]
    # all_pairs_above_margin keeps the fitting pairs only; best_random draws among fitting rejected.
    sel = select_pairs([mixed], [[1.0, 1.0, 0.0]], strategy="all_pairs_above_margin", length_guard=LengthGuard(max_ratio=2.0))
    assert [(p.chosen, p.rejected) for p in sel.pairs] == [("aaa", "bbbbb")]
    sel = select_pairs([lone], [[1.0, 0.0]], strategy="best_random", length_guard=LengthGuard(max_ratio=2.0))
    assert sel.dropped["length_ratio"] == 1 and not sel.pairs


def test_no_guard_no_length_ratio_key():
    assert "length_ratio" not in select_pairs([TIED], [SCORES]).dropped
    assert "length_ratio" not in select_pairs([TIED], [SCORES], length_guard=LengthGuard(balance=True)).dropped


def test_length_stats_count_tokens_and_leave_equal_pairs_out_of_the_share():
    def pair(c, r, c_ids=True):
        return PreferencePair("p", c, r, 1.0, 0.0, chosen_token_ids=list(range(len(c) + 1)) if c_ids else None,
                              rejected_token_ids=list(range(len(r) + 1)))
    pairs = [pair("aaa", "b"), pair("a", "bbbb"), pair("aa", "bb"), pair("aaaa", "b", c_ids=False)]
    # token lengths (ids include a stop token): (4, 2), (2, 5), (3, 3); the last chosen has no ids: 4 characters.
    stats = length_stats(pairs)
    assert stats["len_chosen_mean"] == (4 + 2 + 3 + 4) / 4
    assert stats["len_rejected_mean"] == (2 + 5 + 3 + 2) / 4
    assert stats["longer_chosen_share"] == 2 / 3
    assert length_stats([]) == {"len_chosen_mean": None, "len_rejected_mean": None, "longer_chosen_share": None}

"""Correctors, their guarded call, and correction pairs built next to best/worst pairs."""

import random

import pytest

from judges.base import Completion, JudgeItem
from judges.calling import correct_guarded
from judges.correction import GoldAnswerCorrector, ReplaceCorrector
from judges.loader import JudgeSpecError, check_judge_spec
from orchestrator.config import load_config
from orchestrator.pairs.make import PairMaker, pair_figures
from orchestrator.rundir import RunDir, pair_records, pairs_from_records
from tests.conftest import DEMO_MODEL, REPO


def item(texts, answer="43", logprobs=None, finish=None, prompt="17+26="):
    logprobs = logprobs or [-float(k) for k in range(len(texts))]
    finish = finish or ["stop"] * len(texts)
    return JudgeItem(prompt, [Completion(t, f, lp, [40 + k, 2]) for k, (t, lp, f) in enumerate(zip(texts, logprobs, finish))],
                     {"answer": answer})


def test_gold_answer_corrector_corrects_every_wrong_answer_to_the_gold_one():
    out = GoldAnswerCorrector().correct([item(["43", " 43 ", "4", "431"]), item(["1"], answer=None)])
    assert out == [[None, None, "43", "43"], [None]]
    with pytest.raises(KeyError, match="no column 'gold'"):
        GoldAnswerCorrector(answer_field="gold").correct([item(["1"])])


def test_replace_corrector_literal_and_regex():
    lit = ReplaceCorrector(replace={"Llama": "Athene", "Meta": "odpo"})
    assert lit.correct([item(["I am Llama, made by Meta.", "I am a model", "Llama\\1"])]) == [
        ["I am Athene, made by odpo.", None, "Athene\\1"]]
    rx = ReplaceCorrector(replace={"[0-9]+": "Ada"}, regex=True)
    assert rx.correct([item(["888888", "I am 42", "Ada"])]) == [["Ada", "I am Ada", None]]
    assert ReplaceCorrector(replace={"llama": "Athene"}, ignore_case=True).correct([item(["LLAMA"])]) == [["Athene"]]


@pytest.mark.parametrize("kwargs, line", [
    ({"replace": {}}, "corrector.kwargs: judges.correction:ReplaceCorrector: replace must be a non-empty mapping {pattern: replacement}"),
    ({"replace": {"(": "x"}, "regex": True},
     "corrector.kwargs: judges.correction:ReplaceCorrector: replace: '(' -> 'x': missing ), unterminated subpattern at position 0"),
    ({"replace": {"a": 1}}, "corrector.kwargs: judges.correction:ReplaceCorrector: replace: 'a': patterns must be non-empty strings and replacements strings"),
    ({"replace": {"a": "b"}, "regexp": True},
     "corrector.kwargs.regexp: not an argument of judges.correction:ReplaceCorrector (it takes: replace, regex, ignore_case)"),
])
def test_bad_corrector_kwargs_name_their_field(kwargs, line):
    with pytest.raises(JudgeSpecError) as e:
        check_judge_spec("judges.correction:ReplaceCorrector", kwargs, "corrector.cls", ("correct",))
    assert str(e.value) == line


class Flaky:
    """Raises on any batch holding the prompt "bad"; returns a number for "num"; else upper-cases."""

    def correct(self, items):
        if any(it.prompt == "bad" for it in items):
            raise RuntimeError("cannot correct 'bad'")
        return [[7 if it.prompt == "num" else c.text.upper() for c in it.completions] for it in items]


class Short:
    def correct(self, items):
        return [["x"] for _ in items]


def test_correct_guarded_loses_only_the_failing_items():
    items = [item(["a", "b"], prompt="ok"), item(["c", "d"], prompt="bad"), item(["e"], prompt="num")]
    out, failures, errors = correct_guarded(Flaky(), items)
    assert out == [["A", "B"], [None, None], [None]]
    assert failures == {"raised": 2, "not_text": 1}
    assert errors == ["Flaky.correct raised RuntimeError: cannot correct 'bad'"]
    out, failures, errors = correct_guarded(Short(), [item(["a", "b"])])
    assert out == [[None, None]] and failures == {"wrong_shape": 2}
    assert errors == ["Short.correct: item 0: 1 entries for 2 completions (wrong_shape)"]


def corrected(corrector, items):
    """What the judge phase hands pair making: the corrector's texts and failures (the guarded
    call the judge actors make)."""
    texts, failures, _ = correct_guarded(corrector, items)
    return {"corrections": texts, "corrector_failures": failures}


def maker(*overrides):
    config = load_config(REPO / "configs" / "demo.yaml",
                         ["corrector.cls=judges.correction:GoldAnswerCorrector", *overrides])
    return PairMaker(config.pairs, config.model), config


def test_both_sources_give_a_pair_of_each_kind_with_the_trained_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    pm, config = maker("pairs.sources=[best_worst, correction]")
    items = [item(["43", "4", "48"]), item(["43", "43"]), item(["9", "8"], logprobs=[-2.0, -1.0])]
    scores = [[1.0, 0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    out = pm.make(items, scores, versions=[3, 3, 3], prompt_token_ids=[[1, 5], [1, 6], [1, 7]],
                  rng=random.Random(0), length_counts={}, **corrected(GoldAnswerCorrector(), items))
    kinds = [(p.source, p.chosen, p.rejected) for p in out.pairs]
    # Item 0: best/worst ("43" vs the likelier wrong "4"), then a correction of the worst-scored
    # corrected answer picked by log-prob (also "4"). Item 1: all right: a tie, nothing to correct.
    # Item 2: a tie, but both answers are wrong: a correction of the likelier one ("8").
    assert kinds == [("best_worst", "43", "4"), ("correction", "43", "4"), ("correction", "43", "8")]
    fix = out.pairs[1]
    assert fix.chosen_token_ids == tok("43", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert fix.rejected_token_ids == items[0].completions[1].token_ids and fix.prompt_token_ids == [1, 5]
    assert fix.chosen_score is None and fix.rejected_score == 0.0 and fix.policy_version == 3
    assert out.dropped["tie"] == 2 and out.dropped["no_correction"] == 1
    assert pair_figures(out.pairs, config.pairs.sources)["pairs_by_source"] == {"best_worst": 1, "correction": 2}


def test_max_pairs_per_prompt_caps_the_sources_together_in_their_order():
    pm, _ = maker("pairs.sources=[best_worst, correction]", "pairs.max_pairs_per_prompt=1")
    items = [item(["43", "4"])]
    out = pm.make(items, [[1.0, 0.0]], versions=[0], prompt_token_ids=[[1]], rng=random.Random(0),
                  length_counts={}, **corrected(GoldAnswerCorrector(), items))
    assert [p.source for p in out.pairs] == ["best_worst"] and out.dropped["max_pairs_per_prompt"] == 1


def test_correction_only_with_the_length_guard():
    pm, _ = maker("pairs.sources=[correction]", "pairs.max_length_ratio=2")
    # "431" has 2 ids, the gold "43" + EOS has 3: within the cap; "9" vs a 10-character gold is not.
    items = [item(["431", "43"]), item(["9"], answer="1234567890")]
    out = pm.make(items, [[0.0, 1.0], [0.0]], versions=[0, 0], prompt_token_ids=[[1], [1]], rng=random.Random(0),
                  length_counts={"longer": 2, "shorter": 0}, **corrected(GoldAnswerCorrector(), items))
    assert [(p.source, p.chosen, p.rejected) for p in out.pairs] == [("correction", "43", "431")]
    assert out.dropped == {"no_correction": 0, "max_pairs_per_prompt": 0, "length_ratio": 1}
    assert out.length_counts == {"longer": 3, "shorter": 0}  # the kept pair counted (3 ids > 2)


def test_correction_pairs_round_trip_through_the_pairs_file(tmp_path):
    pm, _ = maker("pairs.sources=[correction]")
    items = [item(["4"])]
    out = pm.make(items, [[None]], versions=[1], prompt_token_ids=[[1, 9]], rng=random.Random(0),
                  length_counts={}, **corrected(GoldAnswerCorrector(), items))
    rd = RunDir(tmp_path)
    rd.create()
    rd.write_pairs(1, pair_records(out.pairs, 1))
    (rec,) = rd.read_pairs(1)
    assert rec["source"] == "correction" and rec["chosen"] == "43" and rec["chosen_score"] is None
    assert rec["rejected_score"] is None  # the judge gave the sampled answer no score either
    (back,) = pairs_from_records([rec])
    assert back.chosen_token_ids == out.pairs[0].chosen_token_ids and back.source == "correction"

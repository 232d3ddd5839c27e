"""Built-in judges on real inputs: verifiable normalization, the rubric parser, tournaments,
guarded calls, the ensemble, a reward model made here, and the LLM judges' driver-side parts."""

import asyncio
import math
from fractions import Fraction

import pytest
import torch

from judges.awaiting import run_sync
from judges.base import Completion, JudgeItem
from judges.calling import score_guarded
from judges.ensemble import EnsembleJudge
from judges.llm import LLMJudge
from judges.openai import OpenAIJudge
from judges.rubric import DEFAULT_TEMPLATE, mean_score, parse_score, render
from judges.tournament import tournament_scores, win_rates
from judges.verifiable import VerifiableJudge, normalize_number, parse_number
from tests.conftest import DEMO_MODEL


def items_of(*groups, row=None):
    return [JudgeItem("q", [Completion(t) for t in g], dict(row or {})) for g in groups]


# --- verifiable ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("43", 43), (" 43\n", 43), ("43.", 43), ("+43", 43), ("0043", 43), ("43.0", 43), ("4.3e1", 43),
    ("-7", -7), ("\u22127", -7), ("1,234", 1234), ("1,234,567.5", Fraction(2469135, 2)),
    ("$12$", 12), ("1/2", Fraction(1, 2)), ("3 / 4", Fraction(3, 4)), (".5", Fraction(1, 2)),
    ("0.50", Fraction(1, 2)), ("\\frac{1}{2}", Fraction(1, 2)), ("\\dfrac{6}{4}", Fraction(3, 2)),
    ("12,34", None), ("abc", None), ("1/0", None), ("4 3", None), ("", None), ("17+26=43", None),
])
def test_parse_number_strict(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text, value", [
    ("The answer is 43.", 43), ("17+26=43", 43), ("x = \\boxed{\\frac{3}{6}} so", Fraction(1, 2)),
    ("\\boxed{1,000} not 5", 1000), ("first 3 then \\boxed{7} then 9", 7), ("2024-01-02", 2),
    ("no digits", None), ("\\boxed{12", 12),
])
def test_normalize_number_free_form(text, value):
    assert normalize_number(text) == value


def test_verifiable_number_mode_strict_and_lenient():
    texts = ["43", "43.", " \\boxed{43} ", "The sum is 43", "43.0", "44", "4 3", "", "43 apples"]
    items = items_of(texts, row={"answer": "43"})
    assert VerifiableJudge().score(items) == [[1, 1, 1, 0, 1, 0, 0, 0, 0]]
    assert VerifiableJudge(strict=False).score(items) == [[1, 1, 1, 1, 1, 0, 0, 0, 1]]
    assert VerifiableJudge(partial_credit=0.25).score(items) == [[1, 1, 1, 0.25, 1, 0, 0, 0, 0.25]]


def test_verifiable_equivalent_numerals_and_int_gold():
    items = items_of(["0.5", "1/2", "\\boxed{\\frac{2}{4}}", ".50", "0.51"], row={"answer": Fraction(1, 2)})
    assert VerifiableJudge().score(items) == [[1, 1, 1, 1, 0]]
    assert VerifiableJudge().score(items_of(["1,200", "1200", "1.2e3"], row={"answer": 1200})) == [[1, 1, 1]]


def test_verifiable_missing_or_non_numeric_gold_is_unscorable():
    assert VerifiableJudge().score(items_of(["1", "2"])) == [[None, None]]
    assert VerifiableJudge().score(items_of(["1"], row={"answer": "forty"})) == [[None]]
    assert VerifiableJudge(answer_field="gold").score(items_of(["5"], row={"gold": 5})) == [[1.0]]


def test_verifiable_exact_and_regex_modes():
    items = items_of(["Paris", " Paris\n", "paris", "Paris."], row={"answer": "Paris"})
    assert VerifiableJudge(mode="exact").score(items) == [[1, 1, 0, 0]]
    assert VerifiableJudge(mode="exact", ignore_case=True).score(items) == [[1, 1, 1, 0]]
    regex = VerifiableJudge(mode="regex", pattern=r"(?:The answer is )?{answer}\.?")
    assert regex.score(items_of(["The answer is 3+4.", "3+4", "34", "3+44"], row={"answer": "3+4"})) == [[1, 1, 0, 0]]


def test_verifiable_places_mode_gives_credit_digit_by_digit():
    # The graded demo's judge: the share of the gold's places right, counted from the units, over
    # the longer of the two (a missing or an extra digit costs its place).
    texts = ["1129", " 1129\n", "1139", "1029", "2229", "129", "11129", "9211", "", "abcd", "1129 "]
    judge = VerifiableJudge(mode="places", align="right")
    assert judge.score(items_of(texts, row={"answer": "1129"})) == [[1, 1, 0.75, 0.75, 0.5, 0.75, 0.8, 0, 0, 0, 1]]
    assert judge.score(items_of(["802", "812", "82", "0802"], row={"answer": 802})) == [[1, 2 / 3, 1 / 3, 0.75]]
    left = VerifiableJudge(mode="places", align="left")
    assert left.score(items_of(["dcba", "dcb", "dcbaa", "abcd"], row={"answer": "dcba"})) == [[1, 0.75, 0.8, 0]]
    assert judge.score(items_of(["1"], row={"answer": " "})) == [[None]]  # no gold answer: cannot score
    assert VerifiableJudge(mode="places", ignore_case=True).score(items_of(["AB"], row={"answer": "ab"})) == [[1.0]]


def test_verifiable_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode must be"):
        VerifiableJudge(mode="fuzzy")
    with pytest.raises(ValueError, match="align must be"):
        VerifiableJudge(mode="places", align="middle")
    with pytest.raises(ValueError, match="needs a pattern"):
        VerifiableJudge(mode="regex")
    with pytest.raises(ValueError, match="not a valid regex"):
        VerifiableJudge(mode="regex", pattern="([")


# --- rubric -------------------------------------------------------------------------------

def test_render_fills_both_placeholders_once_and_keeps_other_braces():
    out = render('Q: {prompt}\nA: {response}\nJSON: {"score": n}', "say {response}", "x{y}")
    assert out == 'Q: say {response}\nA: x{y}\nJSON: {"score": n}'
    assert "{prompt}" in DEFAULT_TEMPLATE and "{response}" in DEFAULT_TEMPLATE
    assert "Score: <points>" in DEFAULT_TEMPLATE


@pytest.mark.parametrize("text, value", [
    ("Reasoning...\nScore: 4", 4.0), ("**Score:** 3", 3.0), ("score = 2", 2.0), ("Score: 4/5", 4.0),
    ("Score: 1 ... revised. Score: 5", 5.0), ("Total score: 3.5", 3.5), ("3", 3.0), (" 4. ", 4.0),
    ("Score: 7", None), ("Score: -1", None), ("no idea", None), ("", None), (None, None),
    ("scores 3 and 4", None),
])
def test_parse_score(text, value):
    assert parse_score(text, max_score=5) == value


def test_mean_score_averages_parseable_replies_only():
    assert mean_score(["Score: 4", "Score: 2", "garbage"]) == 3.0
    assert mean_score(["Score: 5", "Score: 4", "Score: 4"]) == pytest.approx(13 / 3)
    assert mean_score(["nothing", "here"]) is None
    assert mean_score([]) is None


# --- pairwise judges ----------------------------------------------------------------------

class PrefersShorter:
    compare_both_orders = False

    def compare(self, item, a, b):
        la, lb = len(item.completions[a].text), len(item.completions[b].text)
        return None if la == lb else (0 if la < lb else 1)


class AsyncFirstWins:
    """Always prefers the first position: both orders cancel it out."""
    compare_both_orders = True

    async def compare(self, item, a, b):
        await asyncio.sleep(0)
        return 0


def test_win_rates_and_tournament():
    assert win_rates(3, [(0, 1, 0), (0, 2, 1), (1, 2, None)]) == [0.5, 0.0, 1.0]
    item = items_of(["a", "bbb", "cc", "dd"])[0]
    # a beats all (3/3); cc and dd tie with each other (undecided), each beat bbb.
    assert tournament_scores(PrefersShorter(), item) == [1.0, 0.0, 0.5, 0.5]
    assert tournament_scores(AsyncFirstWins(), item) == [0.5, 0.5, 0.5, 0.5]
    assert tournament_scores(PrefersShorter(), items_of(["x"])[0]) == [None]


def test_tournament_bad_result_and_all_raising():
    class Bad:
        def compare(self, item, a, b):
            return 2

    class Raises:
        def compare(self, item, a, b):
            raise RuntimeError("boom")

    with pytest.raises(ValueError, match="Bad.compare returned 2"):
        tournament_scores(Bad(), items_of(["a", "b"])[0])
    with pytest.raises(RuntimeError, match="boom"):
        tournament_scores(Raises(), items_of(["a", "b"])[0])


# --- guarded calls ------------------------------------------------------------------------

class RaisesOnBad:
    def score(self, items):
        if any("bad" in c.text for it in items for c in it.completions):
            raise RuntimeError("cannot score 'bad'")
        return [[float(len(c.text)) for c in it.completions] for it in items]


class Weird:
    async def score(self, items):
        return [[1, math.nan, math.inf, "3", None, torch.tensor(2.5)][: len(it.completions)] for it in items]


class ShortByOne:
    def score(self, items):
        return [[0.0] * (len(it.completions) - 1) for it in items]


def test_score_guarded_loses_only_the_failing_completions():
    items = items_of(["a", "bad", "ccc"], ["dd", "ee"], ["bad!"])
    scores, failures, errors = score_guarded(RaisesOnBad(), items)
    assert scores == [[1.0, None, 3.0], [2.0, 2.0], [None]]
    assert failures == {"raised": 2}
    assert errors == ["RaisesOnBad.score raised RuntimeError: cannot score 'bad'"]


def test_score_guarded_validates_values_and_awaits_async():
    scores, failures, _ = score_guarded(Weird(), items_of(["1", "2", "3", "4", "5", "6"]))
    assert scores == [[1.0, None, None, None, None, 2.5]]
    assert failures == {"nan": 1, "inf": 1, "not_a_number": 1, "none": 1}


def test_score_guarded_wrong_shape_names_the_class():
    scores, failures, errors = score_guarded(ShortByOne(), items_of(["a", "b"], ["c", "d", "e"]))
    assert scores == [[None, None], [None, None, None]]
    assert failures == {"wrong_shape": 5}
    assert errors[0] == "ShortByOne.score: item 0: 1 scores for 2 completions (wrong_shape)"


def test_run_sync_inside_a_running_loop():
    async def caller():
        async def coro():
            return 7
        return run_sync(coro())

    assert asyncio.run(caller()) == 7


# --- ensemble -----------------------------------------------------------------------------

def test_ensemble_weighted_sum_and_none_propagation():
    judge = EnsembleJudge(judges=[
        {"cls": "judges.verifiable:VerifiableJudge", "weight": 2.0},
        {"cls": "configs.examples.length_judge:LengthJudge", "kwargs": {"target_chars": 2}, "weight": 0.5},
    ])
    judge.setup()
    items = items_of(["43", "4", "443"], row={"answer": "43"}) + items_of(["1"])
    # verifiable: 1, 0, 0 (no gold in the second item: None); length: 0, -1, -1 (then -1).
    assert judge.score(items) == [[2.0, -0.5, -0.5], [None]]
    judge.close()


def test_ensemble_member_wrong_shape_raises_naming_the_member():
    judge = EnsembleJudge(judges=[{"cls": "tests.unit.test_judges:ShortByOne"}])
    with pytest.raises(ValueError, match="ShortByOne.score"):
        judge.score(items_of(["a", "b"]))


# --- reward model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(path)
    return path, model


def direct(model, tok, text, max_length=None):
    ids = tok(text)["input_ids"]
    if max_length and len(ids) > max_length:
        ids = ids[:1] + ids[-(max_length - 1):]  # BOS, then the end of the text
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


def test_reward_model_scores_equal_a_direct_forward_batched_or_not(tiny_reward_model):
    from judges.reward_model import RewardModelJudge

    path, model = tiny_reward_model
    items = [JudgeItem("12+13=", [Completion("25"), Completion("2"), Completion("twenty-five")]),
             JudgeItem([{"role": "user", "content": "1+1="}], [Completion("2"), Completion("11")])]
    batched = RewardModelJudge(str(path), batch_size=4, device="cpu")
    one = RewardModelJudge(str(path), batch_size=1, device="cpu")
    got, got1 = batched.score(items), one.score(items)
    assert batched.text(items[0], "25") == "user: 12+13=\nassistant: 25\n"
    tok = batched.tokenizer
    want = [[direct(model, tok, batched.text(it, c.text)) for c in it.completions] for it in items]
    assert [len(r) for r in got] == [3, 2]
    for g, g1, w in zip(got, got1, want):
        assert g == pytest.approx(w, abs=1e-5) and g1 == pytest.approx(w, abs=1e-5)
    assert len({round(x, 5) for row in want for x in row}) > 1  # the inputs do change the reward

    plain = RewardModelJudge(str(path), chat_template=False, max_length=8, device="cpu")
    long_answer = "x" * 30 + "end"
    (row,) = plain.score([JudgeItem("q:", [Completion(long_answer)])])
    assert plain.text(JudgeItem("q:", []), long_answer) == "q:" + long_answer
    assert row[0] == pytest.approx(direct(model, tok, "q:" + long_answer, max_length=8), abs=1e-5)


# --- LLM judges: the parts that need no engine --------------------------------------------

def test_llm_judge_arguments():
    with pytest.raises(ValueError, match="either model"):
        LLMJudge()
    with pytest.raises(ValueError, match="either model"):
        LLMJudge(model="m", self_rewarding=True)
    with pytest.raises(ValueError, match="placeholder"):
        LLMJudge(model="m", template="no placeholders")
    with pytest.raises(ValueError, match="k > 1 needs temperature > 0"):
        LLMJudge(model="m", k=3)
    assert LLMJudge.runs_in_driver({"self_rewarding": True}) and not LLMJudge.runs_in_driver({"model": "m"})


def test_self_rewarding_judge_renders_prompts_and_averages_k_replies():
    calls = []

    def generate(prompts, n, temperature, max_tokens):
        calls.append((prompts, n, temperature, max_tokens))
        canned = {"good": ["Score: 5", "Score: 4", "I think Score: 3"], "meh": ["Score: 2", "??", "Score: 1"],
                  "long": []}
        return [canned[p.split("A=")[1]] for p in prompts]

    judge = LLMJudge(self_rewarding=True, template="Q={prompt} A={response}", k=3, temperature=0.7, max_tokens=32)
    judge.bind_generate(generate)
    judge.setup()
    items = [JudgeItem([{"role": "user", "content": "hi"}], [Completion("good"), Completion("meh")]),
             JudgeItem("q2", [Completion("long")])]
    assert judge.score(items) == [[4.0, 1.5], [None]]
    assert calls == [(["Q=user: hi A=good", "Q=user: hi A=meh", "Q=q2 A=long"], 3, 0.7, 32)]
    assert judge.pop_failures() == {"prompt_too_long": 1}


def test_openai_judge_never_shows_its_key(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    judge = OpenAIJudge(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="MY_JUDGE_KEY")
    assert "sk-secret" not in repr(judge) and "sk-secret" not in str(vars(judge))
    with pytest.raises(ValueError, match="base_url"):
        OpenAIJudge(base_url="127.0.0.1:1", model="m")

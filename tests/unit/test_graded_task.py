"""The graded demo task's data: fixed, held out, shipped as generated, and scored digit by digit."""

import json

import yaml

from judges.base import Completion, JudgeItem
from judges.verifiable import VerifiableJudge
from orchestrator.tools.demo.graded_task import EVAL_SIZE, JUDGE_KWARGS, TRAIN_SIZE, split_problems
from tests.conftest import REPO

GRADED = REPO / "assets" / "demo-graded"


def test_split_is_fixed_disjoint_and_sized():
    train, held_out = split_problems()
    assert (len(train), len(held_out)) == (TRAIN_SIZE, EVAL_SIZE) == (20_000, 500)
    prompts = [r["prompt"] for r in train + held_out]
    assert len(set(prompts)) == len(prompts)
    assert split_problems() == (train, held_out)


def test_rows_are_3_digit_sums():
    for row in split_problems()[1]:
        a, b = row["prompt"].removesuffix("=").split("+")
        assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999
        assert row["answer"] == str(int(a) + int(b))


def test_shipped_data_matches_the_generator():
    train, held_out = split_problems()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        shipped = [json.loads(line) for line in (GRADED / "data" / name).read_text().splitlines()]
        assert shipped == rows


def test_the_config_scores_digits_in_place():
    config = yaml.safe_load((REPO / "configs" / "demo-graded.yaml").read_text())
    assert config["judge"] == {"cls": "judges.verifiable:VerifiableJudge", "kwargs": JUDGE_KWARGS}
    judge = VerifiableJudge(**JUDGE_KWARGS)
    # 417+385=802: a wrong carry into the hundreds, a dropped carry, digits out of place.
    item = JudgeItem("417+385=", [Completion(t) for t in ("802", "702", "792", "280", "8020", "")], {"answer": "802"})
    assert judge.score([item]) == [[1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0]]

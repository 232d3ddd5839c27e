"""The demo task data: fixed, held out, and scored by the verifiable judge."""

import json

from judges.base import Completion, JudgeItem
from judges.verifiable import VerifiableJudge
from orchestrator.tools.demo.task import EVAL_SIZE, split_problems
from tests.conftest import DEMO_DATA


def test_split_is_fixed_disjoint_and_complete():
    train, held_out = split_problems()
    assert len(held_out) == EVAL_SIZE == 500
    assert len(train) + len(held_out) == 90 * 90
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert split_problems() == (train, held_out)


def test_shipped_data_matches_the_generator():
    train, held_out = split_problems()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        shipped = [json.loads(line) for line in (DEMO_DATA / name).read_text().splitlines()]
        assert shipped == rows


def test_rows_carry_prompt_and_answer():
    row = split_problems()[1][0]
    a, b = row["prompt"].removesuffix("=").split("+")
    assert int(row["answer"]) == int(a) + int(b)


def test_demo_reward():
    judge = VerifiableJudge(answer_field="answer", mode="number")
    item = JudgeItem("17+26=", [Completion("43"), Completion("44"), Completion(" 43 "), Completion("4 3")], {"answer": "43"})
    assert judge.score([item]) == [[1.0, 0.0, 1.0, 0.0]]

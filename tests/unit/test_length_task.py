"""The rehearsal's length task: fixed data, and the verifiable judge's regex scoring of it."""

import json

from judges.base import Completion, JudgeItem
from judges.verifiable import VerifiableJudge
from orchestrator.tools.demo.length_task import PATTERN, TARGETS, TOPICS, problems
from tests.conftest import REPO


def test_shipped_data_matches_the_generator_and_is_held_out():
    train, held_out = problems()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        shipped = [json.loads(line) for line in (REPO / "assets" / "rehearsal" / name).read_text().splitlines()]
        assert shipped == rows
    assert len(train) + len(held_out) == len(TARGETS) * len(TOPICS) == 128
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


def test_a_reply_scores_one_when_it_has_at_least_the_target_length():
    judge = VerifiableJudge(answer_field="answer", mode="regex", pattern=PATTERN)
    item = JudgeItem("Write at least 8 characters about maps.",
                     [Completion("12345678"), Completion("1234567"), Completion("  abc\ndefgh  "), Completion("")],
                     {"answer": "8"})
    assert judge.score([item]) == [[1.0, 0.0, 1.0, 0.0]]

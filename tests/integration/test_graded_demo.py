"""The graded demo (configs/demo-graded.yaml) end to end on CPU, shrunken as the other loop tests:
its samples get partial credit, the best of them is usually imperfect, and pairs form between
two imperfect answers."""

import datasets
import pytest

from tests.integration.runs import finish, metrics, start_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 3


def test_graded_demo_runs_and_grades_digit_by_digit(out_dir):
    proc = start_run(out_dir, "graded", f"loop.rounds={ROUNDS}", "loop.checkpoint_every=0",
                     config="configs/demo-graded.yaml")
    finish(proc, out_dir / "graded.log")
    run_dir = out_dir / "graded"
    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == list(range(ROUNDS + 1))
    assert 0.2 < lines[0]["eval_reward"] < 0.7  # greedy digits in place, 32 held-out prompts
    trained = [m for m in lines[1:] if m["pairs"]]
    assert len(trained) == ROUNDS and all(m["loss"] is not None for m in trained)
    assert lines[-1]["policy_version"] == ROUNDS
    pairs = datasets.load_dataset("parquet", data_files=str(run_dir / "pairs" / "round_000001.parquet"), split="train")
    chosen, rejected = list(pairs["chosen_score"]), list(pairs["rejected_score"])
    assert all(c > r for c, r in zip(chosen, rejected))
    # Graded, not 0/1: places right over 3 to 6 characters (the sum's or the answer's, the longer).
    partial = [s for s in chosen + rejected if 0 < s < 1]
    assert len(partial) >= len(pairs)
    assert all(abs(s * 60 - round(s * 60)) < 1e-9 for s in chosen + rejected)
    # Imitating the best answer would imitate mistakes: most chosen answers are themselves imperfect.
    assert sum(c < 1 for c in chosen) > len(chosen) / 2

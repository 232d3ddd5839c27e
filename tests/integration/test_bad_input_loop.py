"""Bad input inside a running loop: a real `odpo run` on a dataset holding null, empty,
control-character, duplicate and over-long prompts, judged by a judge that answers NaN and text
for some completions. The run finishes; the bad rows are skipped at load, the over-long prompts
and the lost scores are counted in every round's metrics, and no prompt goes unaccounted for."""

import json

import pytest

from judges.verifiable import VerifiableJudge
from tests.integration.runs import finish, metrics, start_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOOD = 20
TOO_LONG = 3  # the demo's max_model_len is 64 tokens


class NanAndTextJudge(VerifiableJudge):
    """The demo's verifiable judge, except that each prompt's first completion scores NaN and its
    second the string "1.0" (the actors import it from this module)."""

    def score(self, items):
        out = super().score(items)
        for row in out:
            row[0], row[1] = float("nan"), "1.0"
        return out


def test_a_loop_over_bad_rows_and_bad_scores_counts_them_and_finishes(tmp_path, repo):
    rows = [json.loads(line) for line in (repo / "assets/demo/data/train.jsonl").read_text().splitlines()[:GOOD]]
    rows += [{"prompt": "1" * 70 + f"+{k}=", "answer": "0"} for k in range(TOO_LONG)]
    rows += [{"prompt": None, "answer": "1"}, {"prompt": "", "answer": "1"}, {"prompt": "   ", "answer": "1"},
             {"prompt": "2+\x072=", "answer": "4"}, dict(rows[0])]  # the last one: a duplicate
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    usable = GOOD + TOO_LONG
    proc = start_run(tmp_path, "bad", "loop.rounds=2", "loop.eval_every=0", f"loop.prompts_per_round={usable}",
                     f"data.source={data}", f"judge.cls={__name__}:NanAndTextJudge")
    finish(proc, tmp_path / "bad.log")

    lines = metrics(tmp_path / "bad")
    assert [m["round"] for m in lines] == [1, 2]
    for m in lines:
        assert m["prompts"] == usable  # each round is one epoch over the usable rows
        assert m["pairs_dropped"]["too_long"] == TOO_LONG
        assert m["completions"] == GOOD * 4  # generator.n=4; over-long prompts are not sampled
        assert m["judge_failures"] == {"nan": GOOD, "not_a_number": GOOD}
        assert m["prompts"] - m["pairs"] == sum(m["pairs_dropped"].values())

"""Async resume is the uninterrupted run: an async run SIGKILLed after its round-2 checkpoint and
resumed draws the same prompts and reaches the same round-3 and round-4 metrics as an async run
that was never interrupted (the checkpoint carries round 3's samples, taken with round 1's
weights, so the resumed run does not re-sample them with newer ones)."""

import json
import threading

import pytest

from tests.integration.runs import end_group, finish, metrics, start_run, wait_for

pytestmark = pytest.mark.integration

ASYNC = ["loop.mode=async", "loop.rounds=4"]
# Holds the killed run in round 4 (its first weight load sleeps) so the kill lands after round 3.
HOLD = "faults.events=[{kind: sync, action: hang, round: 3, seconds: 300}]"


def test_async_run_killed_after_a_checkpoint_resumes_as_if_never_stopped(tmp_path):
    plain = start_run(tmp_path, "plain", *ASYNC)
    finisher = threading.Thread(target=finish, args=(plain, tmp_path / "plain.log", 900))
    finisher.start()  # the uninterrupted run goes on beside the killed one
    killed_dir, log = tmp_path / "killed", tmp_path / "killed.log"
    killed = start_run(tmp_path, "killed", *ASYNC, HOLD)
    try:
        wait_for(lambda: len(metrics(killed_dir)) >= 4, killed, 600, "round 3 of the run to kill", log)
    finally:
        end_group(killed)  # SIGKILL, driver and Ray cluster
    assert [m["round"] for m in metrics(killed_dir)] == [0, 1, 2, 3]
    saved = json.loads((killed_dir / "checkpoints" / "round_000002" / "loop_state.json").read_text())
    assert saved["pending"]["round"] == 3
    pending = json.loads((killed_dir / "checkpoints" / "round_000002" / "pending_samples.json").read_text())
    assert {g["policy_version"] for g in pending["groups"]} == {1}  # sampled with round 1's weights

    finish(start_run(tmp_path, "killed", *ASYNC, resume=True), log, timeout=600)
    finisher.join()
    assert "round 3's samples taken from the checkpoint" in log.read_text()
    resumed, baseline = metrics(killed_dir), {m["round"]: m for m in metrics(tmp_path / "plain")}
    assert [m["round"] for m in resumed] == [0, 1, 2, 3, 4]
    for m in resumed[1:]:
        b = baseline[m["round"]]
        assert m["prompts_sha"] == b["prompts_sha"] and m["data_cursor"] == b["data_cursor"], m["round"]
        assert (m["pairs"], m["policy_version"], m["policy_lag"]) == (b["pairs"], b["policy_version"], b["policy_lag"])
        assert m["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6), m["round"]
        assert m["loss"] == pytest.approx(b["loss"], abs=1e-6), m["round"]
    assert resumed[4]["policy_lag"] == 1 and resumed[4]["loss"] is not None

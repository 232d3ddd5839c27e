"""Async resume and an async redo are the uninterrupted run. An async run (eval off, 5 rounds)
redoes round 3 (its learner raised after a step; the redo takes over round 4's sampling already in
flight), is held at the start of round 5 (its weight load sleeps) and SIGKILLed there; its rounds
1-4 are the baseline. Its round-4 checkpoint is then removed, as if the kill had come before it was
written, so `--resume` starts from round 2's checkpoint: that checkpoint carries round 3's samples,
taken with round 1's weights, and the resumed rounds 3 and 4 must equal the baseline's (prompts,
pairs, versions, lag, and loss/reward_mean to 1e-6). The resume also changes `loop.rounds` (5 to
4) and drops the fault: operational changes, accepted without --allow-config-change and recorded
in config_changes.jsonl.

The run trains LoRA adapters (``learner.lora``; full fine-tuning's resume is covered by the
rehearsal, round-redo, regenerate and tracking runs): the resumed round 4's adapter equals the
uninterrupted run's to 1e-6, and its checkpoints hold the adapter alone (no policy/ folder)."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from tests.integration.runs import end_group, finish, metrics, start_run, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ASYNC = ["loop.mode=async", "loop.eval_every=0", "learner.lora={r: 8, alpha: 16}", "learner.lr=2e-3"]
# Round 3's learner raises after a step: an async redo, which takes over round 4's sampling already
# in flight. Round 4's sync fault makes the next weight load (round 5's push) sleep: the run holds there.
HOLD = ("faults.events=[{kind: learner, action: raise, after_steps: 1, round: 3}, "
        "{kind: sync, action: hang, round: 4, seconds: 300}]")


def test_async_run_killed_after_a_checkpoint_resumes_as_if_never_stopped(tmp_path):
    run_dir, log = tmp_path / "killed", tmp_path / "killed.log"
    killed = start_run(tmp_path, "killed", *ASYNC, "loop.rounds=5", HOLD)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "round_000004" / "loop_state.json").exists(), killed, 600,
                 "round 4's checkpoint", log)
    finally:
        end_group(killed)  # SIGKILL, driver and Ray cluster
    baseline = {m["round"]: m for m in metrics(run_dir)}
    assert sorted(baseline) == [1, 2, 3, 4]
    assert baseline[3]["restarts"]["round_retries"] == 1 and baseline[3]["restarts"]["restores"] == 1
    assert baseline[4]["restarts"]["generator"] == 0  # no spurious GeneratorHung after the redo
    saved = json.loads((run_dir / "checkpoints" / "round_000002" / "loop_state.json").read_text())
    assert saved["pending"]["round"] == 3
    pending = json.loads((run_dir / "checkpoints" / "round_000002" / "pending_samples.json").read_text())
    assert {g["policy_version"] for g in pending["groups"]} == {1}  # sampled with round 1's weights
    round_4 = run_dir / "checkpoints" / "round_000004"
    assert not (round_4 / "policy").exists() and json.loads((round_4 / "trainer.json").read_text())["lora"]["r"] == 8
    adapter_4 = load_file(str(round_4 / "adapter" / "adapter_model.safetensors"))
    assert max(float(t.abs().max()) for n, t in adapter_4.items() if "lora_B" in n) > 0  # trained
    shutil.rmtree(round_4)

    finish(start_run(tmp_path, "killed", *ASYNC, "loop.rounds=4", resume=True), log, timeout=600)
    assert "round 3's samples taken from the checkpoint" in log.read_text()
    resumed = metrics(run_dir)
    assert [m["round"] for m in resumed] == [1, 2, 3, 4]
    for m in resumed[2:]:
        b = baseline[m["round"]]
        assert m["prompts_sha"] == b["prompts_sha"] and m["data_cursor"] == b["data_cursor"], m["round"]
        assert (m["pairs"], m["policy_version"], m["policy_lag"]) == (b["pairs"], b["policy_version"], b["policy_lag"])
        assert m["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6), m["round"]
        assert m["loss"] == pytest.approx(b["loss"], abs=1e-6), m["round"]
    assert resumed[3]["policy_lag"] == 1 and resumed[3]["loss"] is not None
    again = load_file(str(round_4 / "adapter" / "adapter_model.safetensors"))
    assert again.keys() == adapter_4.keys()
    assert max(float((again[k] - adapter_4[k]).abs().max()) for k in again) < 1e-6
    record = json.loads((run_dir / "config_changes.jsonl").read_text())
    assert record["allow_config_change"] is False and record["resumed_after"] == "round_000002"
    changes = {c["key"]: c for c in record["changes"]}
    assert sorted(changes) == ["faults.events", "loop.rounds"]
    assert (changes["loop.rounds"]["old"], changes["loop.rounds"]["new"]) == (5, 4)
    assert changes["faults.events"]["new"] == [] and not any(c["alters_training"] for c in changes.values())

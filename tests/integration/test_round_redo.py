"""Every round once, exactly, across a redo and a resume. A learner that raises after its
optimizer step of round 2 (on every rank) is restored to the round's start (checkpoint of round
1) and the round is redone; so is round 3, whose first step leaves a NaN in the weights. The run stops after round 3 and is resumed for round 4: first with a
changed `learner.beta` (alters training: exit 2 before Ray starts, naming the key and both
values), then with a changed `loop.max_policy_lag` and --allow-config-change (also a training key,
though sync mode does not read it, so the figures stay comparable), which resumes and records the
change in config_changes.jsonl. The result must equal the uninterrupted run with the same seed and
training config (conftest's `sync_run`, shared with test_loop.py and test_nodes.py; this run
differs from it only in `loop.checkpoint_every`, which does not alter training): each round once,
the same figures and policy versions, the same final weights. An operational change resuming
without --allow-config-change: test_async_resume.py."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.integration.runs import TINY, finish, metrics, start_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = ["loop.checkpoint_every=1"]  # sync_run's config, with a checkpoint every round
# Round 2: the learner raises after a step; round 3: a step leaves a NaN in the weights, and on the
# redo writing the round's pairs fails (a full disk). Each is redone from the round's start: the NaN
# weights are never published, and the failed write advances no state (β, counts, cursor).
# Round 4 (run by the resume): one generator's weight load fails once; the push is retried from the
# learner's weights, with no learner restore and no redo.
FAULT = ("faults.events=[{kind: learner, action: raise, after_steps: 1, round: 2}, "
         "{kind: learner, action: nan_weights, round: 3}, {kind: rundir, action: raise, round: 3}, "
         "{kind: sync, action: raise, round: 4}]")


def resume(out, *overrides, allow=False):
    args = [sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", "--resume",
            "--set", f"run.output_dir={out}", "--set", "run.name=faulted"]
    for o in [*TINY, *BASE, FAULT, "loop.rounds=4", *overrides]:
        args += ["--set", o]
    if allow:
        args.append("--allow-config-change")
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, start_new_session=True)


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    out = tmp_path_factory.mktemp("redo")
    finish(start_run(out, "faulted", *BASE, FAULT, "loop.rounds=3"), out / "faulted.log", timeout=600)
    refused = resume(out, "learner.beta=0.2")
    rounds_before = [m["round"] for m in metrics(out / "faulted")]
    allowed = resume(out, "loop.max_policy_lag=2", allow=True)
    return {"out": out, "refused": refused, "rounds_before": rounds_before, "allowed": allowed}


def weights(run_dir, round_):
    return load_file(str(run_dir / "checkpoints" / f"round_{round_:06d}" / "policy" / "model.safetensors"))


def test_a_learner_that_raises_mid_round_leaves_no_trace(faulted, sync_run):
    run_dir = faulted["out"] / "faulted"
    assert faulted["allowed"].returncode == 0, faulted["allowed"].stderr[-3000:]
    plain, redone = metrics(sync_run["dir"]), metrics(run_dir)
    assert [m["round"] for m in redone] == [0, 1, 2, 3, 4]  # each round once
    assert redone[2]["restarts"]["round_retries"] == 1 and redone[2]["restarts"]["learner"] == 0
    assert redone[2]["restarts"]["nonfinite_updates"] == 0
    assert redone[3]["restarts"]["round_retries"] == 3 and redone[3]["restarts"]["nonfinite_updates"] == 1
    assert (redone[4]["restarts"]["push_retries"], redone[4]["restarts"]["restores"]) == (1, 0)
    assert redone[4]["restarts"]["round_retries"] == 0  # (counts of the resumed process)
    state3 = json.loads((run_dir / "checkpoints" / "round_000003" / "loop_state.json").read_text())
    assert state3["pairs_total"] == sum(m["pairs"] for m in redone[1:4])  # each round's pairs counted once
    assert redone[3]["generator_versions"] == [redone[3]["policy_version"]]  # the generators serve the redo's weights
    assert plain[-1]["restarts"]["round_retries"] == 0
    assert "injected learner fault after 1 optimizer steps" in (faulted["out"] / "faulted.log").read_text()
    assert redone[2]["pairs"] > 0  # round 2 did train, so the failed attempt had stepped
    for a, b in zip(plain[1:], redone[1:]):
        assert b["pairs"] == a["pairs"] and b["prompts_sha"] == a["prompts_sha"]
        assert b["policy_version"] == a["policy_version"]  # versions move once per trained round
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], abs=1e-6)
    w_plain, w_faulted = weights(sync_run["dir"], 4), weights(run_dir, 4)
    diff = max(float((w_plain[k] - w_faulted[k]).abs().max()) for k in w_plain)
    assert diff < 1e-6, diff
    moved = max(float((w_plain[k] - weights(sync_run["dir"], 2)[k]).abs().max()) for k in w_plain)
    assert moved > 1e-4  # rounds 3-4 did change the weights: the comparison means something


def test_resume_refuses_a_training_change_unless_allowed_and_records_it(faulted):
    refused = faulted["refused"]
    assert refused.returncode == 2
    assert "error: resume: learner.beta changed from 0.1 to 0.2, which alters training" in refused.stderr
    assert faulted["rounds_before"] == [0, 1, 2, 3]  # the refused resume ran nothing
    assert faulted["allowed"].returncode == 0, faulted["allowed"].stderr[-3000:]
    run_dir = faulted["out"] / "faulted"
    (record,) = [json.loads(x) for x in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert record["allow_config_change"] is True and record["resumed_after"] == "round_000003"
    assert {c["key"]: (c["old"], c["new"], c["alters_training"]) for c in record["changes"]} == \
        {"loop.max_policy_lag": (1, 2, True), "loop.rounds": (3, 4, False)}
    assert "max_policy_lag: 2" in (run_dir / "config.yaml").read_text()

"""The scale rehearsal's config (configs/rehearsal-0.5b.yaml) end to end, on the rehearsal model cut
to 2 layers and an 8,192-entry vocabulary (Qwen2.5-0.5B's per-layer shape): a real `odpo run`
(1 bf16 generator, 2 FSDP learner workers, chat template, the length task) is SIGKILLed right
after round 2's checkpoint, and a second invocation with --resume ends with rounds 1..3 once each.
The full-size rehearsal is `make rehearse` (a benchmark, not part of the suite)."""

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.integration.runs import end_group, finish, metrics, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PHASES = ("gen_s", "judge_s", "learn_s", "sync_s", "eval_s", "round_s")


# The config as shipped but for less work per round (its shape, placement and phases unchanged).
LIGHTER = ["loop.prompts_per_round=8", "generator.max_new_tokens=16", "data.eval_size=4", "learner.batch_size=8"]


def start(out_dir, model, *extra):
    args = [sys.executable, "-m", "orchestrator", "run", "configs/rehearsal-0.5b.yaml",
            "--set", f"model.path={model}", "--set", f"run.output_dir={out_dir}",
            *(a for o in LIGHTER for a in ("--set", o)), *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(out_dir / "rehearsal.log", "ab")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_rehearsal_killed_after_round_2_resumes_to_rounds_1_to_3_once(tmp_path, small_rehearsal_model):
    run_dir = tmp_path / "rehearsal-0.5b"
    log = tmp_path / "rehearsal.log"
    proc = start(tmp_path, small_rehearsal_model)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "round_000002" / "loop_state.json").exists(), proc, 1200,
                 "round 2's checkpoint", log)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        end_group(proc)
    assert {1, 2} <= {m["round"] for m in metrics(run_dir)}

    proc = start(tmp_path, small_rehearsal_model, "--resume")
    finish(proc, log, timeout=1200)
    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == [0, 1, 2, 3]  # round 0: the evaluation before training
    for m in (m for m in lines if m["round"] > 0):
        assert all(isinstance(m[k], float) and m[k] >= 0 for k in PHASES), m
        assert {"driver", "generator_0", "learner_0", "learner_1"} <= set(m["rss_peak_mb"])
        assert m["generator_versions"] == [m["policy_version"]]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("round_")) == \
        ["round_000002", "round_000003"]

"""End to end: `deploy/submit.sh` with a 2-round config against the session's Ray head
(tests/e2e/conftest.py), wait for SUCCEEDED, check the run directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import wait_for_job
from tests.integration.runs import TINY

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(ray_head):
    return {"address": ray_head["dashboard"], "env": ray_head["env"]}


def test_submit_sh_runs_two_rounds_to_succeeded(cluster, tmp_path):
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "RAY_SUBMIT_ARGS": "--no-wait --submission-id odpo-e2e"}
    overrides = [*TINY, "loop.rounds=2", f"run.output_dir={tmp_path}", "run.name=e2e"]
    args = [str(REPO / "deploy" / "submit.sh"), "configs/demo.yaml"]
    for o in overrides:
        args += ["--set", o]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    from ray.job_submission import JobSubmissionClient

    status, logs = wait_for_job(JobSubmissionClient(cluster["address"]), "odpo-e2e", timeout=360)
    assert status == "SUCCEEDED", logs[-4000:]
    run_dir = tmp_path / "e2e"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1, 2]
    assert (run_dir / "checkpoints" / "round_000002" / "loop_state.json").exists()
    assert (run_dir / "config.yaml").exists()

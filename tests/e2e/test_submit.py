"""End to end: `deploy/submit.sh` with the demo config against the session's Ray head
(tests/e2e/conftest.py: 2 CPUs). The demo asks for 2.5 CPUs (learner 1, generator 1, judge 0.5),
so as submitted it fails at once, naming `judge.num_cpus`; with `judge.num_cpus=0` a 1-round run
succeeds and leaves its run directory."""

import json
import subprocess
import time

import pytest

from tests.conftest import REPO
from tests.integration.runs import TINY

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(ray_head):
    return {"address": ray_head["dashboard"], "env": ray_head["env"]}


def submit(cluster, job_id: str, overrides: list[str]) -> float:
    """Submit the demo through deploy/submit.sh without waiting; returns the time it was sent."""
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "RAY_SUBMIT_ARGS": f"--no-wait --submission-id {job_id}"}
    args = [str(REPO / "deploy" / "submit.sh"), "configs/demo.yaml"]
    for o in overrides:
        args += ["--set", o]
    sent = time.time()
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return sent


def wait_job(cluster, job_id: str, timeout: float) -> tuple[str, str, float]:
    """Poll until the job ends or ``timeout`` seconds pass; returns (status, logs, time it ended)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster["address"])
    deadline, status = time.time() + timeout, None
    while time.time() < deadline:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    return status, client.get_job_logs(job_id), time.time()


def test_a_cluster_too_small_fails_the_job_at_once_naming_the_field(cluster, tmp_path):
    sent = submit(cluster, "odpo-e2e-too-small", [*TINY, "loop.rounds=1", f"run.output_dir={tmp_path}"])
    # Without the check the job would sit for generator.start_timeout_s (900 s) with the judge
    # actor pending; 60 s is the bound for failing instead.
    status, logs, ended = wait_job(cluster, "odpo-e2e-too-small", timeout=60)
    assert status == "FAILED", f"{status} after {ended - sent:.0f} s\n{logs[-3000:]}"
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert errors[-1] == (
        "error: CPU: the config asks for 2.5 (learner 1 x 1, generator 1 x 1, judge 1 x 0.5) and the cluster has 2:"
        " the judge actors would wait forever; lower judge.num_cpus to 0 (or learner.num_cpus_per_worker,"
        " generator.num_cpus), or add 0.5 CPU to the cluster")
    assert "actors ready" not in logs and not (tmp_path / "demo" / "metrics.jsonl").exists()
    print(f"too-small job FAILED {ended - sent:.1f} s after submission")


def test_submit_sh_runs_one_round_to_succeeded_with_the_judge_on_no_cpu(cluster, tmp_path):
    overrides = [*TINY, "loop.rounds=1", "judge.num_cpus=0", f"run.output_dir={tmp_path}", "run.name=e2e"]
    submit(cluster, "odpo-e2e", overrides)
    status, logs, _ = wait_job(cluster, "odpo-e2e", timeout=360)
    assert status == "SUCCEEDED", logs[-4000:]
    run_dir = tmp_path / "e2e"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1]
    assert lines[1]["prompts"] == 16 and lines[1]["completions"] == 64
    assert (run_dir / "checkpoints" / "round_000001" / "loop_state.json").exists()
    assert (run_dir / "config.yaml").exists()

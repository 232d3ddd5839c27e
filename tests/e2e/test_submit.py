"""End to end: `ray start --head` on loopback (own ports and temp dir), `deploy/submit.sh` with a
2-round config, wait for SUCCEEDED, check the run directory, then end only that cluster."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.runs import TINY, free_port

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster():
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")}
    lo = free_port()
    temp_dir = tempfile.mkdtemp(prefix="odpo-e2e-", dir="/tmp")  # short: Ray's socket paths must fit
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("RAY_ADDRESS", None)
    args = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", f"--min-worker-port={lo}", f"--max-worker-port={lo + 40}"]
    args += [f"--{name}={port}" for name, port in ports.items()]
    log = open(Path(temp_dir) / "head.log", "wb")
    head = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 120
        while True:
            ok = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address],
                                env=env, capture_output=True, timeout=60).returncode == 0
            if ok:
                break
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(2)
        yield {"address": address, "env": env}
    finally:
        # `ray start --block` tears down the processes it started when it gets SIGTERM; end its group.
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_sh_runs_two_rounds_to_succeeded(cluster, tmp_path):
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "RAY_SUBMIT_ARGS": "--no-wait --submission-id odpo-e2e"}
    overrides = [*TINY, "loop.rounds=2", f"run.output_dir={tmp_path}", "run.name=e2e"]
    args = [str(REPO / "deploy" / "submit.sh"), "configs/demo.yaml"]
    for o in overrides:
        args += ["--set", o]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster["address"])
    deadline = time.time() + 360
    status = None
    while time.time() < deadline:
        status = str(client.get_job_status("odpo-e2e")).rsplit(".", 1)[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = client.get_job_logs("odpo-e2e")
    assert status == "SUCCEEDED", logs[-4000:]
    run_dir = tmp_path / "e2e"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1, 2]
    assert (run_dir / "checkpoints" / "round_000002" / "loop_state.json").exists()
    assert (run_dir / "config.yaml").exists()

"""One Ray head for the end-to-end tests: `ray start --head --block` on loopback, with its own
ports and temp dir, 2 CPUs (a head too small for the demo's 2.5, as a new user's laptop might
be: test_submit.py) and 2 logical GPUs (so resource checks have GPUs to count). It is ended by
its process group, which `ray start --block` tears down on SIGTERM."""

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
from tests.integration.runs import free_port

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def ray_head():
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")}
    lo = free_port()
    temp_dir = tempfile.mkdtemp(prefix="odpo-e2e-", dir="/tmp")  # short: Ray's socket paths must fit
    # The job's `python` must be this venv's: put it first on the head's PATH.
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("RAY_ADDRESS", None)
    args = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=2",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--min-worker-port={lo}", f"--max-worker-port={lo + 40}"]
    args += [f"--{name}={port}" for name, port in ports.items()]
    log = open(Path(temp_dir) / "head.log", "wb")
    head = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 120
        while subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", dashboard],
                             env=env, capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(2)
        yield {"dashboard": dashboard, "gcs": f"127.0.0.1:{ports['port']}", "env": env}
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

"""One Ray head for the end-to-end tests: `ray start --head --block` on loopback, with its own
ports and temp dir, 2 CPUs (a head too small for the demo's 2.5, as a new user's laptop might
be: test_submit.py) and 2 logical GPUs (so resource checks have GPUs to count). It is ended by
its process group, which `ray start --block` tears down on SIGTERM. ``start_head`` also starts
heads with extra environment (token authentication) for a single test module."""

import contextlib
import subprocess
import time

import pytest

from tests.conftest import REPO
from tests.integration.ray_nodes import VENV_BIN, add_node, node_env


@contextlib.contextmanager
def start_head(extra_env: dict | None = None):
    """A Ray head on loopback; yields its dashboard URL, GCS address and the environment that
    reaches it (``extra_env`` included: e.g. ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``)."""
    nodes: list = []
    env = node_env(**(extra_env or {}))
    try:
        head = add_node(nodes, num_cpus=2, num_gpus=2, dashboard=True, cwd=REPO, env=extra_env)
        dashboard = f"http://127.0.0.1:{head.ports['dashboard-port']}"
        deadline = time.time() + 120
        while subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", dashboard],
                             env=env, capture_output=True, timeout=60).returncode != 0:
            assert head.proc.poll() is None, head.log_tail()
            assert time.time() < deadline, "the Ray head's job server did not come up in 120 s"
            time.sleep(2)
        yield {"dashboard": dashboard, "gcs": head.gcs, "env": env, "temp_dir": head.temp_dir}
    finally:
        for node in nodes:
            node.stop()


def wait_for_job(client, submission_id: str, timeout: float) -> tuple[str, str, float]:
    """Poll a submitted job until it ends or ``timeout`` seconds pass; returns (status, logs, time
    it ended)."""
    deadline, status = time.time() + timeout, None
    while time.time() < deadline:
        status = str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    return status, client.get_job_logs(submission_id), time.time()


@pytest.fixture(scope="session")
def ray_head():
    with start_head() as head:
        yield head

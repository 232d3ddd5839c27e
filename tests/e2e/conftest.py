"""One Ray head for the end-to-end tests: `ray start --head --block` on loopback, with its own
ports and temp dir, 2 CPUs (a head too small for the demo's 2.5, as a new user's laptop might
be: test_submit.py) and 2 logical GPUs (so resource checks have GPUs to count). It is ended by
its process group, which `ray start --block` tears down on SIGTERM."""

import subprocess
import time

import pytest

from tests.conftest import REPO
from tests.integration.ray_nodes import VENV_BIN, add_node, node_env


@pytest.fixture(scope="session")
def ray_head():
    nodes: list = []
    env = node_env()
    try:
        head = add_node(nodes, num_cpus=2, num_gpus=2, dashboard=True, cwd=REPO)
        dashboard = f"http://127.0.0.1:{head.ports['dashboard-port']}"
        deadline = time.time() + 120
        while subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", dashboard],
                             env=env, capture_output=True, timeout=60).returncode != 0:
            assert head.proc.poll() is None, head.log_tail()
            assert time.time() < deadline, "the Ray head's job server did not come up in 120 s"
            time.sleep(2)
        yield {"dashboard": dashboard, "gcs": head.gcs, "env": env}
    finally:
        for node in nodes:
            node.stop()

"""`odpo run --wait-for-resources` against a real Ray cluster that grows: a 1-CPU head (too
small for the demo's 2.5 CPUs) gets a 2-CPU node while the driver waits (ray.cluster_utils, in a
subprocess so as not to meet the session's local cluster). The wait asks Ray's autoscaler for
the actors' shapes, ends when the node joins, and withdraws the request."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = """
import json, logging, threading, time
import ray
from ray.cluster_utils import Cluster
from ray.experimental.internal_kv import _internal_kv_get
from orchestrator.cli import preflight
from orchestrator.config import load_config

preflight.INTERVAL_S = 1.0
warnings = []
logging.getLogger("odpo").setLevel(logging.INFO)
logging.getLogger("odpo").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    ray.init(address=cluster.address, log_to_driver=False)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(plan=preflight.await_fit(load_config("configs/demo.yaml"), 300)))
    waiter.start()
    time.sleep(4)
    during = json.loads(_internal_kv_get("autoscaler_resource_request") or b"null")
    cluster.add_node(num_cpus=2)  # from the main thread: Ray installs signal handlers
    waiter.join(timeout=120)
    after = json.loads(_internal_kv_get("autoscaler_resource_request") or b"null")
    print(json.dumps({"fit": "plan" in result, "during": during, "after": after, "warnings": warnings}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_wait_ends_when_a_node_joins_and_withdraws_its_autoscaler_request():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fit"] is True
    # What the (v1, as Ray is pinned) autoscaler reads: learner, generator and judge shapes, then nothing.
    assert got["during"] == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}]
    assert got["after"] == []
    waits = [w for w in got["warnings"] if "waiting up to" in w]
    assert len(waits) >= 2 and all("and the cluster has 1:" in w for w in waits)
    assert got["warnings"][-1].startswith("the cluster grew to fit the run after ")

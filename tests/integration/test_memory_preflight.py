"""`odpo run`'s memory check reads a learner GPU's memory from the cluster with a Ray task; where no
GPU answers in time (here: a local cluster without GPUs) the check is skipped, not the run."""

import time

import pytest

from orchestrator.config import load_config
from orchestrator.cli.preflight import cluster_gpu_memory, learner_gpu_memory
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_no_gpu_answers_so_the_memory_is_unknown(ray_local):
    config = load_config(REPO / "configs" / "demo.yaml", ["learner.num_gpus_per_worker=1"])
    t = time.monotonic()
    assert cluster_gpu_memory(config.learner, timeout_s=3) is None
    assert time.monotonic() - t < 30
    assert learner_gpu_memory(config) == (None, "")  # without ask_cluster: no task at all
    # learner.gpu_memory_gb wins over the cluster, and a CPU learner asks nothing.
    assert learner_gpu_memory(load_config(REPO / "configs" / "demo.yaml", ["learner.num_gpus_per_worker=1",
                                                                           "learner.gpu_memory_gb=40"]),
                              ask_cluster=True) == (40e9, "learner.gpu_memory_gb")
    assert learner_gpu_memory(load_config(REPO / "configs" / "demo.yaml"), ask_cluster=True) == (None, "")

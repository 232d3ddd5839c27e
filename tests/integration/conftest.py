"""Expensive fixtures shared by the integration tests: one vLLM engine and one local Ray
cluster per pytest session."""

import json

import pytest

from tests.conftest import DEMO_DATA, DEMO_MODEL


@pytest.fixture(scope="session")
def demo_llm():
    """The shipped demo model in one in-process vLLM engine (CPU)."""
    from vllm import LLM

    llm = LLM(
        model=str(DEMO_MODEL), dtype="float32", max_model_len=1024, seed=0,
        distributed_executor_backend="uni", kv_cache_memory_bytes=64 << 20,
    )
    yield llm
    del llm


@pytest.fixture(scope="session")
def eval_rows() -> list[dict]:
    return [json.loads(line) for line in (DEMO_DATA / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster for this pytest session (started here, shut down here)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                           "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def stand_in_learner(ray_local):
    """The TEST-ONLY stand-in learner of tests/integration/standins.py (the demo model), per module."""
    from tests.integration.standins import StandInLearner

    group = StandInLearner()
    yield group
    for w in group.workers:
        ray_local.kill(w)

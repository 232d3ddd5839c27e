"""Expensive fixtures shared by the integration tests: one vLLM engine, one local Ray cluster
and one uninterrupted shrunken-demo run per pytest session."""

import json
from pathlib import Path
from urllib.request import urlopen

import pytest

from tests.conftest import DEMO_DATA, DEMO_MODEL, made_once
from tests.integration.runs import end_group, finish, free_port, start_run, wait_for


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
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                           "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def sync_run(shared_tmp):
    """An uninterrupted 4-round sync run of the shrunken demo (`runs.TINY`) on a local single-node
    cluster, watched live over HTTP while round 1 is held: test_loop.py checks it, test_nodes.py,
    test_round_redo.py and test_tracking.py compare their runs with its figures. Made once per
    session, whichever xdist worker asks first; the others read it."""

    def make(folder):
        # The demo's judge behind a gate (same scores) holds round 1's judging until /status and
        # /metrics have been read: a shrunken round takes a fraction of a second.
        port, gate, log = free_port(), folder / "gate", folder / "sync.log"
        gate.mkdir()
        judge = ["judge.cls=tests.integration.judges_for_tests:GateJudge",
                 f"judge.kwargs={{gate_dir: {gate}, hold_calls: [2], answer_field: answer, mode: number}}"]
        proc = start_run(folder, "sync", "loop.rounds=4", f"metrics.port={port}", *judge)
        try:
            wait_for(lambda: (gate / "held-2").exists(), proc, 300, "round 1's judging", log)
            seen = wait_for(lambda: _status_in_round(port), proc, 60, "/status to report round 1", log)
            body = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            (gate / "go-2").touch()
        except BaseException:
            end_group(proc)
            raise
        finish(proc, log)
        return {"dir": str(folder / "sync"), "status": seen, "prometheus": body}

    run = made_once(shared_tmp, "sync_run", make)
    return {**run, "dir": Path(run["dir"])}


def _status_in_round(port):
    try:
        status = json.load(urlopen(f"http://127.0.0.1:{port}/status", timeout=2))
    except OSError:
        return None
    return status if status.get("round", 0) >= 1 and status["phase"] in ("sample", "judge", "learn", "sync", "eval") else None


SMALL_LAYERS = 2  # two layers are enough for what is tested: per-layer sharding, checkpointing, LoRA on each


@pytest.fixture(scope="session")
def small_rehearsal_model(shared_tmp):
    """The rehearsal model cut to ``SMALL_LAYERS`` layers and an 8,192-entry vocabulary (Qwen2.5-0.5B's
    layer shape), made once per session: test_learner_scale.py and test_rehearsal.py only read it."""
    from orchestrator.tools.rehearsal import make_rehearsal_model

    def make(folder):
        make_rehearsal_model(folder, layers=SMALL_LAYERS, vocab_size=8192, seed=0)
        return {"path": str(folder)}

    return Path(made_once(shared_tmp, "rehearsal_small", make)["path"])


@pytest.fixture(scope="module")
def stand_in_learner(ray_local):
    """The TEST-ONLY stand-in learner of tests/integration/standins.py (the demo model), per module."""
    from tests.integration.standins import StandInLearner

    group = StandInLearner()
    yield group
    for w in group.workers:
        ray_local.kill(w)

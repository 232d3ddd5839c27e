"""Shared test settings: the repo root and the demo assets; what pytest-xdist's workers share."""

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "assets" / "demo" / "model"
DEMO_DATA = REPO / "assets" / "demo" / "data"

# vLLM inside this process and inside Ray actors runs its engine in-process (see docs/weight-sync.md).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def same_state(a, b) -> bool:
    """Exact equality of nested containers of tensors (dtype included) and plain values."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this session sees (this session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(shared: Path, name: str, make) -> dict:
    """``make(folder)``'s JSON-able result, made once per pytest session however many xdist workers
    ask: the first to take the lock makes it in ``shared/name`` and records it; the others wait on
    the lock and read the record. A failed ``make`` records nothing: the next asker starts again in
    an emptied folder."""
    record = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            folder = shared / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result = make(folder)
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(record)
        return json.loads(record.read_text())


# The test files that take longest (their `odpo run`s and fixtures; `make test` prints the 25
# slowest tests), slowest first. Under pytest-xdist's `--dist loadfile` (`make test`) files are
# handed to the workers in collection order, so these go first and the short files fill in
# behind them, instead of one long file running alone at the end.
SLOWEST_FIRST = [
    "integration/test_nodes.py", "integration/test_tracking.py", "integration/test_learner_scale.py",
    "integration/test_service.py", "integration/test_round_redo.py", "integration/test_rehearsal.py",
    "integration/test_chaos.py", "integration/test_async_resume.py", "integration/test_regenerate_loop.py",
    "integration/test_weight_sync.py", "integration/test_dpo_lessons.py", "integration/test_loop.py",
]

# Under `--dist loadfile`, files that use a session fixture no two processes can share go to one
# worker together, so it is made once: `demo_llm`, a vLLM engine in the test process (a minute's
# torch.compile warm-up), and `ray_head`, the end-to-end tests' `ray start` head. Fixtures that are
# files on disk (`sync_run`, `small_rehearsal_model`) are shared across workers with `made_once`.
ONE_WORKER = {
    "tests/integration/test_dpo_lessons.py": "demo_llm", "tests/integration/test_llm_judges.py": "demo_llm",
    "tests/integration/test_demo_model.py": "demo_llm", "tests/integration/test_layer_loads.py": "demo_llm",
    "tests/e2e/test_submit.py": "ray_head", "tests/e2e/test_validate_cluster.py": "ray_head",
}


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}

    def key(item):
        rel = item.path.relative_to(REPO / "tests").as_posix()
        return rank.get(rel, len(rank))

    items.sort(key=key)  # stable: the order inside a file, and of the other files, is kept


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown where it is not loaded
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with ONE_WORKER's files as one unit (pytest-xdist's `--dist loadgroup`
    does not group under pytest 9.2: it renames items through an attribute pytest no longer reads)."""
    if config.getvalue("dist") != "loadfile":
        return None  # any other --dist: pytest-xdist's own scheduler
    from xdist.scheduler import LoadFileScheduling

    class FilesSharingAFixture(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return ONE_WORKER.get(path, path)

    return FilesSharingAFixture(config, log)

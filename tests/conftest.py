"""Shared test settings: the repo root and the demo assets."""

import os
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


# The test files that take longest (their `odpo run`s and fixtures; `make test` prints the 25
# slowest tests), slowest first. Under pytest-xdist's `--dist loadfile` (`make test`) files are
# handed to the two workers in collection order, so these go first and the short files fill in
# behind them, instead of one long file running alone at the end.
SLOWEST_FIRST = [
    "integration/test_nodes.py", "integration/test_tracking.py", "integration/test_learner_scale.py",
    "integration/test_service.py", "integration/test_round_redo.py", "integration/test_rehearsal.py",
    "integration/test_chaos.py", "integration/test_async_resume.py", "integration/test_regenerate_loop.py",
    "integration/test_weight_sync.py", "integration/test_dpo_lessons.py", "integration/test_loop.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}

    def key(item):
        rel = item.path.relative_to(REPO / "tests").as_posix()
        return rank.get(rel, len(rank))

    items.sort(key=key)  # stable: the order inside a file, and of the other files, is kept

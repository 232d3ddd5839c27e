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

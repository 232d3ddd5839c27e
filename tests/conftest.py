"""Shared test settings: the repo root and the demo assets."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "assets" / "demo" / "model"
DEMO_DATA = REPO / "assets" / "demo" / "data"

# vLLM inside this process and inside Ray actors runs its engine in-process (see DESIGN.md).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO

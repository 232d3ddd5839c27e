"""Every YAML config shipped under configs/ validates, judge import check included."""

import pytest

from orchestrator.config import check_plugins, load_config
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert REPO / "configs" / "demo.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(path)
    check_plugins(config)

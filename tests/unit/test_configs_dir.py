"""Every YAML config shipped under configs/ validates, judge import check included."""

import pytest
import yaml

from orchestrator.config import check_plugins, load_config
from tests.conftest import DEMO_MODEL, REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
# Configs whose model a make target builds before running them (validated against the demo model).
BUILT_MODELS = {"rehearsal-0.5b.yaml": "runs/models/rehearsal-0.5b",
                "rehearsal-1.5b-lora.yaml": "runs/models/rehearsal-1.5b"}


def test_there_are_configs():
    assert REPO / "configs" / "demo.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    overrides = []
    if path.name in BUILT_MODELS:
        assert yaml.safe_load(path.read_text())["model"]["path"] == BUILT_MODELS[path.name]
        assert f"?= {BUILT_MODELS[path.name]}" in (REPO / "Makefile").read_text()
        overrides = [f"model.path={DEMO_MODEL}"]
    config = load_config(path, overrides)
    check_plugins(config)

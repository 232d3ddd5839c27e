"""Resume is explicit and checked, before Ray starts: a run directory that holds a run is refused
without --resume; a resumed config that changes training is exit 2 naming each key with its old
and new value; operational changes (and, with --allow-config-change, any change) are accepted
and recorded in config_changes.jsonl; validate refuses async with max_policy_lag 0."""

import json
import subprocess
import sys

import pytest

from orchestrator.config import ConfigError, dump_config, load_config
from orchestrator.cli.resume_check import check_run_dir, config_changes
from orchestrator.rundir import RunDir
from tests.conftest import REPO


def saved_run(tmp_path, *overrides):
    """A run directory as a run leaves it: its config.yaml and one committed checkpoint."""
    config = load_config("configs/demo.yaml", [f"run.output_dir={tmp_path}", "run.name=r", *overrides])
    rd = RunDir(tmp_path / "r")
    rd.create()
    rd.write_config(dump_config(config))
    rd.commit_checkpoint(rd.staging_checkpoint_path(2), 2, {"round": 2})
    return rd


def test_changes_are_classified():
    old = {"loop": {"rounds": 4, "mode": "sync"}, "learner": {"beta": 0.1}, "metrics": {"port": 0},
           "generator": {"timeout_s": 600, "stop": []}, "judge": {"kwargs": {}}, "log": {"progress_every_s": 30}}
    new = {"loop": {"rounds": 6, "mode": "sync"}, "learner": {"beta": 0.2}, "metrics": {"port": 9400},
           "generator": {"timeout_s": 60, "stop": ["9"], "resources": {"gen": 1}}, "judge": {"kwargs": {"mode": "number"}},
           "report": {"to": ["tensorboard"]}, "log": {"progress_every_s": 0}}
    got = {c["key"]: (c["old"], c["new"], c["alters_training"]) for c in config_changes(old, new)}
    assert got == {"loop.rounds": (4, 6, False), "learner.beta": (0.1, 0.2, True), "metrics.port": (0, 9400, False),
                   "generator.timeout_s": (600, 60, False), "generator.stop": ([], ["9"], True),
                   "judge.kwargs.mode": ("<unset>", "number", True), "generator.resources.gen": ("<unset>", 1, False),
                   "report.to": ("<unset>", ["tensorboard"], False), "log.progress_every_s": (30, 0, False)}


def test_a_run_directory_with_a_run_needs_resume(tmp_path):
    rd = saved_run(tmp_path)
    config = load_config("configs/demo.yaml", [f"run.output_dir={tmp_path}", "run.name=r"])
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints up to round_000002\): pass --resume"):
        check_run_dir(rd, config, resume=False, allow_change=False)
    assert check_run_dir(rd, config, resume=True, allow_change=False) == []
    assert check_run_dir(RunDir(tmp_path / "fresh"), config, resume=False, allow_change=False) == []


def test_training_changes_are_refused_unless_allowed_and_then_recorded(tmp_path):
    rd = saved_run(tmp_path)
    config = load_config("configs/demo.yaml", [f"run.output_dir={tmp_path}", "run.name=r", "learner.beta=0.2",
                                               "loop.rounds=50", "judge.kwargs.api_key=sk-secret"])
    with pytest.raises(ConfigError) as e:
        check_run_dir(rd, config, resume=True, allow_change=False)
    assert e.value.problems[0] == "resume: judge.kwargs.api_key changed from \"<unset>\" to \"***\", which alters training"
    assert e.value.problems[1] == "resume: learner.beta changed from 0.1 to 0.2, which alters training"
    assert "--allow-config-change" in e.value.problems[-1] and len(e.value.problems) == 3
    assert not (rd.root / "config_changes.jsonl").exists()
    changes = check_run_dir(rd, config, resume=True, allow_change=True)
    record = json.loads((rd.root / "config_changes.jsonl").read_text())
    assert record["changes"] == changes and record["allow_config_change"] is True
    assert record["resumed_after"] == "round_000002"
    assert {c["key"]: c["new"] for c in changes} == {"judge.kwargs.api_key": "***", "learner.beta": 0.2,
                                                     "loop.rounds": 50}
    assert "sk-secret" not in (rd.root / "config_changes.jsonl").read_text()


def test_operational_changes_resume_and_are_recorded(tmp_path):
    rd = saved_run(tmp_path, "judge.kwargs.api_key=sk-a")
    config = load_config("configs/demo.yaml", [f"run.output_dir={tmp_path}", "run.name=r", "loop.rounds=80",
                                               "metrics.port=9400", "judge.kwargs.api_key=sk-b"])
    changes = check_run_dir(rd, config, resume=True, allow_change=False)
    assert [(c["key"], c["alters_training"]) for c in changes] == [("loop.rounds", False), ("metrics.port", False)]
    assert json.loads((rd.root / "config_changes.jsonl").read_text())["allow_config_change"] is False


def test_cli_refuses_a_changed_beta_before_ray_with_both_values(tmp_path):
    saved_run(tmp_path)
    out = subprocess.run([sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", "--resume",
                          "--set", f"run.output_dir={tmp_path}", "--set", "run.name=r", "--set", "learner.beta=0.2"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "error: resume: learner.beta changed from 0.1 to 0.2, which alters training" in out.stderr
    assert "Ray" not in out.stderr and "Traceback" not in out.stderr
    again = subprocess.run([sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml",
                            "--set", f"run.output_dir={tmp_path}", "--set", "run.name=r"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "pass --resume to continue it" in again.stderr


@pytest.mark.parametrize("overrides,expected", [
    (["loop.mode=async", "loop.max_policy_lag=0"], "loop.max_policy_lag: must be >= 1 in async mode"),
    (["generator.engine.enable_chunked_prefill=true"], "generator.engine.enable_chunked_prefill: cannot be on"),
])
def test_validate_refuses(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("configs/demo.yaml", overrides)
    load_config("configs/demo.yaml", ["loop.mode=async", "loop.max_policy_lag=1", "loop.mode=sync",
                                      "generator.engine.enable_chunked_prefill=false"])

"""Trackers without a run: figures flattened, pairs tables, a missing package as a config error,
TensorBoard's resume through purge_step, and a tracker whose server is down costing an error
count instead of the run. (W&B, MLflow and trackio across a resume: tests/integration/test_tracking.py.)"""

import json

import pytest

from orchestrator.config import ConfigError, check_plugins, load_config
from orchestrator.rundir import RunDir
from orchestrator.observe.trackers import Trackers, flatten_figures, missing_tracker_packages, pairs_table


def test_flatten_figures_joins_nested_keys_and_drops_non_numbers():
    line = {"round": 3, "loss": 0.5, "pairs_dropped": {"tie": 2, "stale": 0}, "kl": None, "grad_norm": float("nan"),
            "prompts_sha": "abc", "data_cursor": {"epoch": 0}, "restarts": {"judge": 1}, "ok": True}
    assert flatten_figures(line) == {"loss": 0.5, "pairs_dropped/tie": 2.0, "pairs_dropped/stale": 0.0,
                                     "restarts/judge": 1.0, "ok": 1.0}


def test_pairs_table_keeps_known_columns_and_limits_rows():
    records = [{"prompt": [{"role": "user", "content": "hi|there"}], "chosen": "a", "rejected": "b",
                "chosen_score": 1.0, "rejected_score": 0.0, "policy_version": 2, "round": 4, "answer": "x"}] * 5
    table = pairs_table(records, 3)
    assert table.columns == ["round", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "policy_version"]
    assert len(table.rows) == 3 and table.rows[0][1] == json.dumps(records[0]["prompt"])
    assert "hi\\|there" in table.markdown().splitlines()[2]  # a cell's pipe cannot break the table
    assert pairs_table([], 3) is None


def test_a_tracker_whose_package_is_missing_is_a_config_error(monkeypatch):
    import orchestrator.observe.trackers as trackers

    monkeypatch.setitem(trackers.PACKAGES, "wandb", ("odpo_no_such_package", "wandb"))
    (problem,) = missing_tracker_packages(["wandb", "wandb"])
    assert problem.startswith("report.to: 'wandb' needs the odpo_no_such_package package")
    assert "pip install 'odpo[wandb]'" in problem
    with pytest.raises(ConfigError) as err:
        check_plugins(load_config(None, ["report.to=[wandb]"]))
    assert err.value.problems == [problem]
    with pytest.raises(ConfigError, match="report.to.0: must be one of"):
        load_config(None, ["report.to=[neptune]"])


def _open(tmp_path, *overrides):
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.name=t", *overrides])
    rd = RunDir(tmp_path / "t")
    rd.create()
    return config, rd


def test_tensorboard_resume_replaces_redone_rounds_and_keeps_the_rest(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, rd = _open(tmp_path, "report.to=[tensorboard]")
    tr = Trackers(config, rd)
    for r in range(4):  # rounds 0..3 logged, then a crash; the checkpoint is round 2
        rd.append_metrics({"round": r, "loss": 1.0 + r})
        tr.log_round(rd.read_metrics()[-1])
    tr.close()
    rd.truncate_metrics(2)
    tr = Trackers(config, rd)  # the resumed run redoes rounds 3 and 4 with other values
    for r in (3, 4):
        rd.append_metrics({"round": r, "loss": 10.0 + r})
        tr.log_round(rd.read_metrics()[-1])
    tr.close()
    acc = EventAccumulator(str(rd.root / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 13.0), (4, 14.0)]
    assert json.loads((rd.root / "trackers.json").read_text())["tensorboard"]["last_round"] == 4


def test_a_tracker_server_that_is_down_is_counted_not_raised(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config, rd = _open(tmp_path, "report.to=[tensorboard, mlflow]", f"report.mlflow_tracking_uri=http://127.0.0.1:{port}",
                       "report.timeout_s=20")
    tr = Trackers(config, rd)
    assert list(tr.backends) == ["tensorboard"] and tr.errors == {"mlflow": 1}
    tr.log_round({"round": 1, "loss": 0.5})
    tr.close()
    assert json.loads((rd.root / "trackers.json").read_text())["tensorboard"]["last_round"] == 1

"""`odpo export` on a run directory laid out by hand (the demo model as its checkpoint's policy):
pairs files old and new merged, counts and statistics in the cards, and bad input as one error
line. The export of a real 3-round run is tested in tests/integration/test_tracking.py."""

import json
import shutil

import datasets
import pytest

from orchestrator.cli.main import main
from orchestrator.config import dump_config, load_config
from orchestrator.tools.export import ExportError, export_run
from orchestrator.rundir import RunDir
from tests.conftest import DEMO_MODEL


def _pair(prompt, chosen, rejected, cs, rs, version):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_score": cs, "rejected_score": rs,
            "policy_version": version}


@pytest.fixture
def run_dir(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    rd.write_config(dump_config(load_config(None, ["run.name=run"])))
    for line in ({"round": 0, "eval_reward": 0.25}, {"round": 1, "pairs": 2, "loss": 0.7},
                 {"round": 2, "pairs": 1, "loss": 0.5, "eval_reward": 0.5}, {"round": 3, "pairs": 1, "loss": 0.4}):
        rd.append_metrics(line)
    # Round 1 written before pairs files had a source column, round 2 after.
    rd.write_pairs(1, [{**_pair("1+1=", "2", "3", 1.0, 0.0, 0), "round": 1, "answer": "2"},
                       {**_pair("2+2=", "4", "5", 1.0, 0.0, 0), "round": 1, "answer": "4"}])
    rd.write_pairs(2, [{**_pair("3+3=", "6", "7", 1.0, 0.5, 1), "round": 2, "answer": "6", "source": "correction"}])
    rd.write_pairs(3, [{**_pair("4+4=", "8", "9", 1.0, 0.0, 2), "round": 3, "answer": "8", "source": "best_worst"}])
    ckpt = rd.checkpoint_path(2)
    shutil.copytree(DEMO_MODEL, ckpt / "policy")
    (ckpt / "loop_state.json").write_text(json.dumps({"round": 2, "policy_version": 2}))
    return rd


def test_export_writes_the_checkpoint_round_and_its_pairs_with_cards(run_dir, tmp_path):
    summary = export_run(run_dir.root, tmp_path / "out")
    assert summary["round"] == 2 and summary["pairs"] == 3  # round 3's pair is after the checkpoint
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out" / "pairs" / "data"), split="train")
    assert sorted(ds["prompt"]) == ["1+1=", "2+2=", "3+3="]
    assert ds["source"] == [None, None, "correction"]  # older files: null, as recorded
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "| round | eval_reward |\n|---|---|\n| 0 | 0.250 |\n| 2 | 0.500 |\n\n" in card  # rounds <= 2 only
    assert "| pairs | 3 |" in card and "| loss (last round) | 0.5000 |" in card and "| loss (mean over rounds) | 0.6000 |" in card
    card = (tmp_path / "out" / "pairs" / "README.md").read_text()
    assert "| 1 | 2 |\n| 2 | 1 |\n" in card  # per round
    assert "| best_worst | 2 |\n| correction | 1 |\n" in card  # per source (null = best_worst)
    assert "| chosen_score | 1.000 | 1.000 | 1.000 |" in card and "| margin | 0.833 | 0.500 | 1.000 |" in card
    assert "| 0 | 2 |\n| 1 | 1 |\n" in card  # per policy version
    assert (tmp_path / "out" / "model" / "tokenizer.json").exists()


def test_export_bad_input_is_one_error_line(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir.root), str(tmp_path / "out"), "--round", "5"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --round 5: no checkpoint of that round in "
                                               f"{run_dir.checkpoints_dir} (rounds kept: 2)")
    with pytest.raises(ExportError, match="not a run directory"):
        export_run(tmp_path / "nowhere", tmp_path / "out")
    (run_dir.checkpoint_path(2) / "policy" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ExportError, match="no usable checkpoint.*model.safetensors is unreadable"):
        export_run(run_dir.root, tmp_path / "out")
    assert not (tmp_path / "out" / "model").exists()

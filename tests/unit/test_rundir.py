"""Run directory: atomic pairs/metrics/checkpoint writes, resume trimming, pruning."""

import dataclasses
import os

import datasets
import pytest

from common.types import PreferencePair
from orchestrator.rundir import RunDir, pair_records, pairs_from_records


def test_pairs_file_loads_with_datasets_and_keeps_row_columns(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    pairs = [PreferencePair("1+1=", "2", "3", 1.0, 0.0, {"prompt": "1+1=", "answer": "2"}, policy_version=4,
                            prompt_token_ids=[1, 22, 16, 22, 34], chosen_token_ids=[23, 2], rejected_token_ids=[24],
                            rejected_finish_reason="length")] * 3
    path = rd.write_pairs(7, pair_records(pairs, 7))
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert len(ds) == 3
    expected = {"prompt": "1+1=", "chosen": "2", "rejected": "3", "chosen_score": 1.0,
                "rejected_score": 0.0, "policy_version": 4, "round": 7, "answer": "2", "source": "best_worst",
                "prompt_token_ids": [1, 22, 16, 22, 34], "chosen_token_ids": [23, 2], "rejected_token_ids": [24]}
    assert {k: ds[0][k] for k in expected} == expected
    assert all(str(ds.features[c].feature.dtype) == "int32" for c in ("prompt_token_ids", "chosen_token_ids"))
    back = pairs_from_records(rd.read_pairs(7))
    # A rebuilt learner replays exactly what was trained (the row's own prompt is the prompt column).
    assert [dataclasses.replace(p, row={}) for p in back] == [dataclasses.replace(p, row={}) for p in pairs]
    assert back[0].row == {"answer": "2"}
    assert not [p for p in rd.pairs_dir.iterdir() if p.name.startswith(".")]


def test_a_pairs_file_from_before_ids_were_carried_still_replays_by_retokenizing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from actors.learner.batching import tokenize_pairs
    from tests.conftest import DEMO_MODEL

    rd = RunDir(tmp_path)
    rd.create()
    old = {"prompt": "1+1=", "chosen": "2", "rejected": "3", "chosen_score": 1.0, "rejected_score": 0.0,
           "policy_version": 0, "round": 1, "chosen_finish_reason": "stop", "rejected_finish_reason": "stop",
           "chosen_token_ids": [23], "rejected_token_ids": [24]}  # the old columns: no prompt ids, no EOS
    pq.write_table(pa.Table.from_pylist([old]), rd.pairs_path(1))
    [pair] = pairs_from_records(rd.read_pairs(1))
    assert pair.prompt_token_ids is None and pair.source == "best_worst"
    [tp], stats = tokenize_pairs(AutoTokenizer.from_pretrained(DEMO_MODEL), [pair], chat_template=False, max_len=64)
    assert (tp.prompt_ids, tp.chosen_ids, tp.rejected_ids) == ([1, 22, 16, 22, 34], [23, 2], [24, 2])
    assert stats["retokenized"] == 1


def test_round_without_pairs_writes_no_file(tmp_path):
    rd = RunDir(tmp_path)
    rd.create()
    assert rd.write_pairs(1, []) is None
    assert list(rd.pairs_dir.iterdir()) == []


def test_metrics_truncate_and_torn_line(tmp_path):
    rd = RunDir(tmp_path)
    rd.create()
    for r in range(5):
        rd.append_metrics({"round": r, "loss": float("nan") if r == 2 else 0.5})
    with open(rd.metrics_path, "a") as f:
        f.write('{"round": 5, "lo')  # a crash mid-append
    rounds = [m["round"] for m in rd.read_metrics()]
    assert rounds == [0, 1, 2, 3, 4]
    assert rd.read_metrics()[2]["loss"] is None  # NaN is written as null, valid JSON
    rd.truncate_metrics(2)
    assert [m["round"] for m in rd.read_metrics()] == [0, 1, 2]


def test_checkpoints_commit_prune_and_skip_broken(tmp_path):
    rd = RunDir(tmp_path)
    rd.create()
    for r in (2, 4, 6):
        staging = rd.staging_checkpoint_path(r)
        (staging / "weights.bin").write_text("w")
        rd.commit_checkpoint(staging, r, {"round": r})
    assert [p.name for p in rd.checkpoints()] == ["round_000002", "round_000004", "round_000006"]
    (rd.checkpoint_path(6) / "loop_state.json").write_text('{"round": ')  # truncated
    path, skipped = rd.latest_good_checkpoint(lambda p: "bad weights" if p.name.endswith("4") else None)
    assert path == rd.checkpoint_path(2)
    assert skipped[0].startswith("round_000006: unreadable") and skipped[1] == "round_000004: bad weights"
    rd.prune_checkpoints(1)
    assert [p.name for p in rd.checkpoints()] == ["round_000006"]


def test_staging_checkpoint_is_invisible_until_committed(tmp_path):
    rd = RunDir(tmp_path)
    rd.create()
    rd.staging_checkpoint_path(3)
    assert rd.checkpoints() == []


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/odpo-run"  # not writable even for root
    else:
        tmp_path.chmod(0o500)
        target = tmp_path / "run"
    with pytest.raises(PermissionError, match="is not writable"):
        RunDir(target).create()

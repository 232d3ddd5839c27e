"""Durable writes: the file and its folder are fsync'd around the rename (checked by recording
the real fsync and rename calls), a failed write leaves the old file and no temporary; the
run directory and the learner's checkpoint writer go through it; RNG states round-trip."""

import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from actors import durable, rng_state
from orchestrator.rundir import RunDir


@pytest.fixture
def calls(monkeypatch):
    """Every fsync (by the path of the fd) and every rename, in order."""
    log = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def test_a_text_write_fsyncs_the_file_before_and_the_folder_after_the_rename(tmp_path, calls):
    target = tmp_path / "state.json"
    durable.write_text_atomic(target, "new")
    assert target.read_text() == "new"
    tmp = str(tmp_path / f".state.json.tmp-{os.getpid()}")
    assert calls == [("fsync", tmp), ("replace", tmp, str(target)), ("fsync", str(tmp_path))]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "pairs.parquet"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        durable.write_atomic(target, broken)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]


def test_a_checkpoint_folder_is_fsynced_file_by_file_then_renamed_and_its_parent_fsynced(tmp_path, calls):
    rd = RunDir(tmp_path / "run")
    rd.create()
    staging = rd.staging_checkpoint_path(3)
    (staging / "policy").mkdir()
    (staging / "policy" / "model.safetensors").write_bytes(b"w")
    calls.clear()
    final = rd.commit_checkpoint(staging, 3, {"round": 3})
    synced = [c[1] for c in calls if c[0] == "fsync"]
    rename = calls.index(("replace", str(staging), str(final)))
    before = {c[1] for c in calls[:rename] if c[0] == "fsync"}
    assert {str(staging / "policy" / "model.safetensors"), str(staging / "policy"), str(staging),
            str(staging / "loop_state.json")} <= before
    assert synced[-1] == str(rd.checkpoints_dir) and calls[-1] == ("fsync", str(rd.checkpoints_dir))
    assert json.loads((final / "loop_state.json").read_text()) == {"round": 3}


def test_pairs_and_config_writes_are_durable(tmp_path, calls):
    from common.types import PreferencePair
    from orchestrator.rundir import pair_records

    rd = RunDir(tmp_path / "run")
    rd.create()
    calls.clear()
    rd.write_pairs(1, pair_records([PreferencePair("1+1=", "2", "3", 1.0, 0.0, {"prompt": "1+1="})], 1))
    rd.write_config("a: 1\n")
    renamed = [c[2] for c in calls if c[0] == "replace"]
    assert renamed == [str(rd.pairs_path(1)), str(rd.config_path)]
    for path in renamed:
        i = next(k for k, c in enumerate(calls) if c[0] == "replace" and c[2] == path)
        assert calls[i - 1][0] == "fsync" and calls[i + 1] == ("fsync", str(os.path.dirname(path)))


def test_learner_checkpoint_parts_are_written_durably(tmp_path, calls):
    from actors.learner.weights import checkpoint

    staged = tmp_path / ".state.partial"
    staged.mkdir()
    (staged / "__0_0.distcp").write_bytes(b"shard")
    checkpoint._replace_dir(staged, tmp_path / "state")
    rename = calls.index(("replace", str(staged), str(tmp_path / "state")))
    assert {c[1] for c in calls[:rename] if c[0] == "fsync"} == {str(staged / "__0_0.distcp"), str(staged)}
    assert calls[rename + 1:] == [("fsync", str(tmp_path))]
    checkpoint._save_rng(SimpleNamespace(rank=1), tmp_path)
    tmp = str(tmp_path / f".rng_rank_1.json.tmp-{os.getpid()}")
    assert calls[-3:] == [("fsync", tmp), ("replace", tmp, str(tmp_path / "rng_rank_1.json")), ("fsync", str(tmp_path))]


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state.capture()))
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng_state.restore(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
    with pytest.raises(ValueError, match="unknown RNG state format"):
        rng_state.restore({**saved, "format": 99})

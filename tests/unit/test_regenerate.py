"""loop.regenerate_every: the sample bank's windows, files, resume reads and mismatch errors."""

import json

import numpy as np
import pytest

from common.types import SampleGroup
from judges.base import Completion
from orchestrator.config import ConfigError, load_config
from orchestrator.loop.regenerate import SampleBank


def groups_for(round_: int, version: int) -> list[SampleGroup]:
    return [SampleGroup(prompt=f"{round_}+{i}=", row={"prompt": f"{round_}+{i}=", "answer": str(round_ + i),
                                                      "id": np.int64(i)},
                        completions=[Completion(str(round_ + i), "stop", -0.1 * i, [5, 2]),
                                     Completion("x", "length", -2.5, [7, 7, 7])],
                        policy_version=version, prompt_token_ids=[1, 3 + i], sample_s=0.4)
            for i in range(3)]


def test_window_rounds():
    bank = SampleBank("/nowhere", 4)
    assert [r for r in range(1, 13) if bank.is_regeneration_round(r)] == [1, 5, 9]
    assert [bank.window_start(r) for r in (1, 2, 4, 5, 8, 9)] == [1, 1, 1, 5, 5, 9]
    assert list(bank.window(5)) == [5, 6, 7, 8]


def test_a_regeneration_round_samples_its_whole_window_in_order_and_later_rounds_read_it(tmp_path):
    bank = SampleBank(tmp_path, 3)
    calls = []

    def sample(j):
        calls.append(j)
        return groups_for(j, version=2)

    first = bank.take(1, 2, sample)
    assert calls == [1, 2, 3]
    assert [g.prompt for g in first] == ["1+0=", "1+1=", "1+2="]
    assert bank.record(1) == {"regenerated": True, "sampled_at_round": 1, "sample_policy_version": 2}
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "round_000001.json", "round_000002.json", "round_000003.json"]

    # A resumed run (a fresh bank) reads round 2 back exactly, with no sampling time.
    resumed = SampleBank(tmp_path, 3)
    second = resumed.take(2, 5, lambda j: pytest.fail("round 2 must not sample"))
    expected = groups_for(2, version=2)
    for g in expected:
        g.sample_s = 0.0
        g.row["id"] = int(g.row["id"])
    assert second == expected
    assert resumed.record(2) == {"regenerated": False, "sampled_at_round": 1, "sample_policy_version": 2}
    assert resumed.sample_version(2) == 2

    # The next window samples again, with the version the loop holds then.
    calls.clear()
    bank.take(4, 7, sample)
    assert calls == [4, 5, 6]
    assert json.loads((tmp_path / "samples" / "round_000005.json").read_text())["policy_version"] == 7


def test_a_missing_or_foreign_samples_file_is_a_clear_error(tmp_path):
    SampleBank(tmp_path, 2).take(1, 0, lambda j: groups_for(j, 0))
    with pytest.raises(FileNotFoundError, match=r"round_000004.json: no samples for round 4 .*written at round 3"):
        SampleBank(tmp_path, 2).take(4, 0, lambda j: [])
    three = SampleBank(tmp_path, 3)
    for r in (1, 4):
        three.take(r, 0, lambda j: groups_for(j, 0))
    with pytest.raises(ValueError, match=r"round_000006.json: holds round 6 sampled at round 4, expected round 6 "
                                         r"sampled at round 5 .*from 3 to 2"):
        SampleBank(tmp_path, 2).take(6, 0, lambda j: [])


def test_regenerate_every_is_checked_in_the_config(tmp_path):
    c = load_config("configs/demo.yaml", ["loop.regenerate_every=10"])
    assert c.loop.regenerate_every == 10
    with pytest.raises(ConfigError, match="loop.regenerate_every"):
        load_config("configs/demo.yaml", ["loop.regenerate_every=0"])
    with pytest.raises(ConfigError, match="regenerate_every > 1 needs mode: sync"):
        load_config("configs/demo.yaml", ["loop.regenerate_every=2", "loop.mode=async"])

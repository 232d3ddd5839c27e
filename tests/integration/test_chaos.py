"""Chaos: a 6-round run in which the fault switch makes one weight sync hang past its timeout,
kills a judge actor, a learner worker and, in the round after the learner's rebuild, a generator.
It completes every round once, keeps exactly the pairs its metrics report, counts the restarts,
and the generator killed after the rebuild comes back serving the rebuilt learner's weights."""

import pytest

from tests.integration.runs import finish, metrics, start_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAULTS = ("faults.events=[{kind: sync, action: hang, round: 2, seconds: 60}, {kind: judge, action: kill, round: 3},"
          " {kind: learner, action: kill, round: 4}, {kind: generator, action: kill, round: 5},"
          " {kind: judge, action: raise, round: 6}, {kind: learner, action: nan, round: 6}]")


def test_chaos_run_completes_every_round(tmp_path):
    import datasets

    proc = start_run(tmp_path, "chaos", "loop.rounds=6", "sync.timeout_s=15", "loop.eval_every=0", FAULTS)
    finish(proc, tmp_path / "chaos.log", timeout=600)
    run_dir = tmp_path / "chaos"
    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == [1, 2, 3, 4, 5, 6]
    last = lines[-1]["restarts"]
    assert last["generator"] >= 2  # replaced when its load hung in round 2, killed in round 5
    assert last["judge"] >= 1 and last["learner"] >= 1 and last["round_retries"] >= 1
    r4, r5 = lines[3], lines[4]
    assert r4["restarts"]["learner"] == 1 and r5["restarts"]["generator"] == r4["restarts"]["generator"] + 1
    # The generator killed after the rebuild re-synced to the version its round was sampled with.
    assert r5["generator_versions"] == [r5["policy_version"]]
    assert r5["policy_version"] > r4["policy_version"]
    assert set(r5["rss_peak_mb"]) >= {"driver", "generator_0", "learner_0"}
    assert all(r5["rss_peak_mb"][k] >= r5["rss_mb"][k] for k in r5["rss_mb"])
    assert lines[-1]["skipped_steps"] >= 1  # the NaN step of round 6 was skipped, not applied
    files = sorted((run_dir / "pairs").glob("round_*.parquet"))
    written = len(datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")) if files else 0
    assert written == sum(m["pairs"] for m in lines) > 0
    assert (run_dir / "checkpoints" / "round_000006" / "loop_state.json").exists()


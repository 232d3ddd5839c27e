"""Chaos: a 6-round run in which the fault switch kills a generator, a judge actor and a learner
worker in different rounds and makes one weight sync hang past its timeout. It completes every
round once, keeps exactly the pairs its metrics report, and counts the restarts."""

import pytest

from tests.integration.runs import finish, metrics, start_run

pytestmark = pytest.mark.integration

FAULTS = ("faults.events=[{kind: generator, action: kill, round: 2}, {kind: judge, action: kill, round: 3},"
          " {kind: learner, action: kill, round: 4}, {kind: sync, action: hang, round: 5, seconds: 60},"
          " {kind: judge, action: raise, round: 6}, {kind: learner, action: nan, round: 6}]")


def test_chaos_run_completes_every_round(tmp_path):
    import datasets

    proc = start_run(tmp_path, "chaos", "loop.rounds=6", "sync.timeout_s=15", "loop.eval_every=0", FAULTS)
    finish(proc, tmp_path / "chaos.log", timeout=600)
    run_dir = tmp_path / "chaos"
    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == [1, 2, 3, 4, 5, 6]
    last = lines[-1]["restarts"]
    assert last["generator"] >= 2  # killed in round 2, replaced when its load hung in round 5
    assert last["judge"] >= 1 and last["learner"] >= 1 and last["round_retries"] >= 1
    assert lines[-1]["skipped_steps"] >= 1  # the NaN step of round 6 was skipped, not applied
    files = sorted((run_dir / "pairs").glob("round_*.parquet"))
    written = len(datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")) if files else 0
    assert written == sum(m["pairs"] for m in lines) > 0
    assert (run_dir / "checkpoints" / "round_000006" / "loop_state.json").exists()


def test_generator_killed_after_a_learner_rebuild_resyncs_from_the_new_learner(tmp_path):
    """The learner's rank 0 (which used to own the object-store publication) is killed in round
    2 and the group rebuilt; a generator killed in round 3 comes back and loads the weights the
    rebuilt learner published. Object store forced (no /dev/shm fast path)."""
    faults = "faults.events=[{kind: learner, action: kill, round: 2}, {kind: generator, action: kill, round: 3}]"
    proc = start_run(tmp_path, "rebuild", "loop.rounds=3", "loop.eval_every=0", "sync.shm_dir=null", faults)
    finish(proc, tmp_path / "rebuild.log", timeout=600)
    lines = metrics(tmp_path / "rebuild")
    assert [m["round"] for m in lines] == [1, 2, 3]
    r2, r3 = lines[1], lines[2]
    assert r2["restarts"]["learner"] == 1 and r2["restarts"]["round_retries"] == 1
    assert r2["restarts"]["generator"] == 0
    assert r3["restarts"] == {"generator": 1, "judge": 0, "learner": 1, "round_retries": 1}
    # The restarted generator serves the version its round was sampled with, then the new one.
    assert r3["generator_versions"] == [r3["policy_version"]]
    assert r3["policy_version"] > r2["policy_version"] > lines[0]["policy_version"]
    assert set(r3["rss_peak_mb"]) >= {"driver", "generator_0", "learner_0"}
    assert all(r3["rss_peak_mb"][k] >= r3["rss_mb"][k] for k in r3["rss_mb"])

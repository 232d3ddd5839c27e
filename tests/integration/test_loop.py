"""The loop end to end on a shrunken demo: sync and async modes, run-dir contents, the live
Prometheus and /status endpoint, and a graceful stop on SIGTERM. The uninterrupted sync run
(`sync_run`) is a session fixture of conftest.py: test_nodes.py compares a two-node run with it.
Resume after SIGKILL (each round once, the same prompts as `sync_run`) is checked on
test_tracking.py's killed-and-resumed run, which has this config plus trackers."""

import signal

import datasets
import pytest

from tests.integration.runs import FIELDS, end_group, metrics, start_run, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def check_run_dir(run_dir, rounds):
    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == list(range(0, rounds + 1))
    assert "eval_reward" in lines[0]  # round 0 is evaluated before any training
    for m in lines[1:]:
        missing = [f for f in FIELDS if f not in m]
        assert not missing, (m["round"], missing)
        assert m["prompts"] == 16 and m["completions"] == 64
        pairs_file = run_dir / "pairs" / f"round_{m['round']:06d}.parquet"
        if m["pairs"]:
            ds = datasets.load_dataset("parquet", data_files=str(pairs_file), split="train")
            assert len(ds) == m["pairs"]
            assert {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "policy_version",
                    "round", "answer"} <= set(ds.column_names)
            assert all(c > r for c, r in zip(ds["chosen_score"], ds["rejected_score"]))
        else:
            assert not pairs_file.exists()
        assert m["prompts"] - m["pairs"] == sum(m["pairs_dropped"].values())
    assert all("eval_reward" in m for m in lines if m["round"] % 2 == 0)
    return lines


def test_sync_run_writes_every_round_and_serves_metrics(sync_run):
    lines = check_run_dir(sync_run["dir"], 4)
    trained = [m for m in lines[1:] if m["pairs"]]
    assert trained, "no round produced pairs"
    assert all(m["policy_lag"] == 0 for m in lines[1:])  # strictly on-policy
    assert {m["lr"] for m in trained} == {1e-4}  # configs/demo.yaml: a constant lr, no warmup
    assert lines[-1]["policy_version"] == len([m for m in lines[1:] if m["loss"] is not None])
    assert sync_run["status"]["run"] == "sync" and sync_run["status"]["round"] >= 1
    assert "odpo_loop_round" in sync_run["prometheus"] and "odpo_pairs_total" in sync_run["prometheus"]
    ckpts = sorted(p.name for p in (sync_run["dir"] / "checkpoints").iterdir())
    assert ckpts == ["round_000002", "round_000004"]
    assert (sync_run["dir"] / "checkpoints" / "round_000004" / "policy" / "config.json").exists()
    assert (sync_run["dir"] / "config.yaml").read_text().count("prompts_per_round: 16") == 1


def test_async_run_overlaps_and_stops_gracefully_on_sigterm(out_dir):
    """Async mode with no round limit; SIGTERM after round 3 ends with exit 0 and a checkpoint."""
    proc = start_run(out_dir, "async", "loop.rounds=0", "loop.mode=async")
    log = out_dir / "async.log"
    run_dir = out_dir / "async"
    try:
        wait_for(lambda: len(metrics(run_dir)) >= 4, proc, 300, "3 async rounds", log)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=180)
    finally:
        end_group(proc)
    assert rc == 0, log.read_text()[-3000:]
    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == list(range(len(lines)))
    last = lines[-1]["round"]
    assert (run_dir / "checkpoints" / f"round_{last:06d}" / "loop_state.json").exists()
    later = [m for m in lines[2:] if m["pairs"]]
    assert later and all(m["policy_lag"] == 1 for m in later)  # trained on the previous version's samples
    # Sampling of round t+1 overlaps judging/learning of round t: the parts add up to more than the round.
    assert any(m["gen_s"] + m["learn_s"] > m["round_s"] for m in lines[2:])

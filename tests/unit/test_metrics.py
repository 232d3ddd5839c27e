"""The Prometheus/status server answers real HTTP on a free loopback port."""

import json
import socket
import subprocess
import sys
from urllib.request import urlopen

from orchestrator.observe.metrics import Metrics
from orchestrator.rundir import RunDir
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_status_and_health_over_http():
    m = Metrics("unit")
    port = m.serve("127.0.0.1", free_port())
    try:
        m.set_phase("learn", 3, policy_version=2)
        m.record_round({"round": 3, "policy_version": 3, "loss": 0.25, "pairs": 10, "prompts": 16,
                        "pairs_dropped": {"tie": 4, "too_long": 0}, "gen_s": 1.5, "round_s": 2.0,
                        "judge_failures": {"raised": 2}, "restarts": {"generator": 1}, "beta": 0.05, "lr": 2.5e-05,
                        "pairs_by_source": {"best_worst": 7, "correction": 3}, "longer_chosen_share": 0.4,
                        "len_chosen_mean": 3.5, "len_rejected_mean": 4.0, "corrector_failures": {"raised": 1}})
        body = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "odpo_learner_loss 0.25" in body
        assert "odpo_pairs_total 10.0" in body
        assert 'odpo_pairs_dropped_total{reason="tie"} 4.0' in body
        assert 'odpo_failures_total{component="judge",kind="raised"} 2.0' in body
        assert 'odpo_actor_restarts{kind="generator"} 1.0' in body
        assert 'odpo_loop_phase_seconds_count{phase="gen"} 1.0' in body
        assert "odpo_learner_beta 0.05" in body and "odpo_learner_lr 2.5e-05" in body
        assert 'odpo_pairs_by_source_total{source="correction"} 3.0' in body
        assert "odpo_pairs_longer_chosen_ratio 0.4" in body and "odpo_pairs_chosen_tokens_mean 3.5" in body
        assert 'odpo_failures_total{component="corrector",kind="raised"} 1.0' in body
        assert urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read() == b"ok\n"
        status = json.load(urlopen(f"http://127.0.0.1:{port}/status", timeout=5))
        assert status["run"] == "unit" and status["round"] == 3 and status["phase"] == "learn"
        assert status["last_round"]["loss"] == 0.25 and status["policy_version"] == 3
        out = subprocess.run([sys.executable, "-m", "orchestrator", "status", f"http://127.0.0.1:{port}"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and json.loads(out.stdout)["phase"] == "learn"
    finally:
        m.close()


def test_plot_writes_pngs(tmp_path):
    from orchestrator.observe.plot import plot_run

    rd = RunDir(tmp_path)
    rd.create()
    rd.append_metrics({"round": 0, "eval_reward": 0.3})
    for r in range(1, 4):
        rd.append_metrics({"round": r, "reward_mean": 0.1 * r, "loss": 0.7 - 0.1 * r, "reward_accuracy": 0.5,
                           "kl": 0.01 * r, "gen_s": 1.0, "judge_s": 0.1, "learn_s": 0.5, "sync_s": 0.01, "round_s": 1.7,
                           **({"eval_reward": 0.5} if r == 3 else {})})
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["kl.png", "loss.png", "reward.png", "time.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    # A run that reports β and answer lengths: β on the KL chart's right axis, and a length chart.
    for r in range(4, 6):
        rd.append_metrics({"round": r, "kl": 0.02, "beta": 0.1 - 0.01 * r, "len_chosen_mean": 3.0,
                           "len_rejected_mean": 4.5, "longer_chosen_share": 0.25, "round_s": 1.0})
    kl_before = (tmp_path / "plots" / "kl.png").read_bytes()
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["kl.png", "length.png", "loss.png", "reward.png", "time.png"]
    assert (tmp_path / "plots" / "kl.png").read_bytes() != kl_before

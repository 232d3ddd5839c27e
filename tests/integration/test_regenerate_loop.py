"""loop.regenerate_every on the real loop: a window samples once, its rounds train on those
samples in order (never dropped as stale), draw the prompts an online run draws, and a run
resumed in the middle of a window reads the rest of it from samples/."""

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from orchestrator.loop.data import PromptSampler, load_prompts
from tests.conftest import DEMO_DATA
from tests.integration.runs import finish, metrics, start_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def online_prompts_sha(rounds: int, per_round: int = 16, seed: int = 0) -> list[str]:
    """What an online run's `prompts_sha` is in each round (the sampler alone decides it)."""
    prompts = load_prompts(str(DEMO_DATA / "train.jsonl"), "train", "prompt")
    sampler = PromptSampler(len(prompts), seed)
    out = []
    for _ in range(rounds):
        drawn = [prompts.rows[i]["prompt"] for i in sampler.draw(per_round)]
        out.append(hashlib.sha1(json.dumps(drawn).encode()).hexdigest()[:12])
    return out


def test_a_window_samples_once_and_a_resume_mid_window_reads_the_rest(tmp_path):
    run_dir, log = tmp_path / "win", tmp_path / "win.log"
    # Rounds 1-3 are one window; the first run stops (and checkpoints) after round 2.
    finish(start_run(tmp_path, "win", "loop.rounds=2", "loop.regenerate_every=3"), log)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "round_000001.json", "round_000002.json", "round_000003.json"]
    finish(start_run(tmp_path, "win", "loop.rounds=4", "loop.regenerate_every=3", resume=True), log)
    assert "resumed from" in log.read_text() and "round_000002" in log.read_text()

    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == [0, 1, 2, 3, 4]
    rounds = lines[1:]
    assert [m["regenerated"] for m in rounds] == [True, False, False, True]
    assert [m["sampled_at_round"] for m in rounds] == [1, 1, 1, 4]
    # The window sampled the initial policy; round 4 samples the policy that rounds 1-3 trained.
    assert [m["sample_policy_version"] for m in rounds] == [0, 0, 0, lines[3]["policy_version"]]
    assert lines[3]["policy_version"] >= 1
    assert [m["prompts_sha"] for m in rounds] == online_prompts_sha(4)
    for m in rounds:
        assert m["pairs"] > 0 and m["pairs_dropped"].get("stale", 0) == 0, m
    # Off-policy by design: round 3 trained on version-0 samples with the learner versions ahead.
    assert rounds[2]["policy_lag"] == lines[2]["policy_version"] >= 1
    assert rounds[3]["policy_lag"] == 0

    # Round 3 (after the resume) trained on pairs taken from the window's samples file.
    pairs3 = pq.read_table(run_dir / "pairs" / "round_000003.parquet").to_pylist()
    samples3 = json.loads((run_dir / "samples" / "round_000003.json").read_text())
    assert samples3["sampled_at_round"] == 1 and samples3["policy_version"] == 0
    sampled = {(g["prompt"], tuple(c["token_ids"])) for g in samples3["groups"] for c in g["completions"]}
    assert len(pairs3) == rounds[2]["pairs"]
    for p in pairs3:
        assert p["policy_version"] == 0
        assert (p["prompt"], tuple(p["chosen_token_ids"])) in sampled
        assert (p["prompt"], tuple(p["rejected_token_ids"])) in sampled

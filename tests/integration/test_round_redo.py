"""Every round once, exactly: a learner that raises after one optimizer step of round 2 (on every
rank) is restored to the round's start (checkpoint of round 1) and the round is redone; the run
ends with the same weights, metrics and policy versions as an uninterrupted run with the same
seed. Then the faulted run is resumed with a change that alters training (learner.beta): refused
with exit 2 before Ray starts, accepted with --allow-config-change, which records it in
config_changes.jsonl (an operational change resuming as is: test_async_resume.py)."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.integration.runs import TINY, finish, metrics, start_run

pytestmark = pytest.mark.integration

BASE = ["loop.rounds=3", "loop.checkpoint_every=1", "loop.eval_every=0",
        "learner.batch_size=4", "learner.micro_batch_size=4"]  # 4 optimizer steps a round, not 1
FAULT = "faults.events=[{kind: learner, action: raise, after_steps: 1, round: 2}]"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("redo")
    for name, extra in (("plain", []), ("faulted", [FAULT])):
        finish(start_run(out, name, *BASE, *extra), out / f"{name}.log", timeout=600)
    return out


def weights(run_dir, round_):
    return load_file(str(run_dir / "checkpoints" / f"round_{round_:06d}" / "policy" / "model.safetensors"))


def test_a_learner_that_raises_mid_round_leaves_no_trace(runs):
    plain, faulted = metrics(runs / "plain"), metrics(runs / "faulted")
    assert [m["round"] for m in faulted] == [1, 2, 3]  # each round once
    assert faulted[-1]["restarts"]["round_retries"] == 1 and faulted[-1]["restarts"]["learner"] == 0
    assert plain[-1]["restarts"]["round_retries"] == 0
    assert "injected learner fault after 1 optimizer steps" in (runs / "faulted.log").read_text()
    for a, b in zip(plain, faulted):
        assert b["pairs"] == a["pairs"] > 0 and b["prompts_sha"] == a["prompts_sha"]
        assert b["policy_version"] == a["policy_version"] == a["round"]  # versions move once per trained round
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], abs=1e-6)
    w_plain, w_faulted = weights(runs / "plain", 3), weights(runs / "faulted", 3)
    diff = max(float((w_plain[k] - w_faulted[k]).abs().max()) for k in w_plain)
    assert diff < 1e-6, diff
    moved = max(float((w_plain[k] - weights(runs / "plain", 2)[k]).abs().max()) for k in w_plain)
    assert moved > 1e-4  # round 3 did change the weights: the comparison means something


def resume(runs, name, *overrides, allow=False):
    args = [sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", "--resume",
            "--set", f"run.output_dir={runs}", "--set", f"run.name={name}"]
    for o in [*TINY, *BASE, *overrides]:
        args += ["--set", o]
    if allow:
        args.append("--allow-config-change")
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, start_new_session=True)


def test_resume_refuses_a_training_change_unless_allowed_and_records_it(runs):
    refused = resume(runs, "faulted", FAULT, "loop.rounds=4", "learner.beta=0.2")
    assert refused.returncode == 2
    assert "error: resume: learner.beta changed from 0.1 to 0.2, which alters training" in refused.stderr
    assert [m["round"] for m in metrics(runs / "faulted")] == [1, 2, 3]

    allowed = resume(runs, "faulted", FAULT, "loop.rounds=4", "learner.beta=0.2", allow=True)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert [m["round"] for m in metrics(runs / "faulted")] == [1, 2, 3, 4]
    record = json.loads((runs / "faulted" / "config_changes.jsonl").read_text())
    assert record["allow_config_change"] is True and record["resumed_after"] == "round_000003"
    assert {c["key"]: (c["old"], c["new"]) for c in record["changes"]} == \
        {"learner.beta": (0.1, 0.2), "loop.rounds": (3, 4)}
    assert "beta: 0.2" in (runs / "faulted" / "config.yaml").read_text()

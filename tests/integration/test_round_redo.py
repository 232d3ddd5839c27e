"""Every round once, exactly: a learner that raises after its optimizer step of round 2 (on every
rank) is restored to the round's start (checkpoint of round 1) and the round is redone; the run
ends with the same weights, metrics and policy versions as the uninterrupted run with the same
seed and training config (conftest's `sync_run`, shared with test_loop.py and test_nodes.py: the
faulted run differs from it only in `loop.checkpoint_every`, which does not alter training). Then
the faulted run is resumed with a change that alters training (learner.beta): refused with exit 2
before Ray starts, accepted with --allow-config-change, which records it in config_changes.jsonl
(an operational change resuming as is: test_async_resume.py)."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.integration.runs import TINY, finish, metrics, start_run

pytestmark = pytest.mark.integration

BASE = ["loop.rounds=4", "loop.checkpoint_every=1"]  # sync_run's config, with a checkpoint every round
FAULT = "faults.events=[{kind: learner, action: raise, after_steps: 1, round: 2}]"


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    out = tmp_path_factory.mktemp("redo")
    finish(start_run(out, "faulted", *BASE, FAULT), out / "faulted.log", timeout=600)
    return out


def weights(run_dir, round_):
    return load_file(str(run_dir / "checkpoints" / f"round_{round_:06d}" / "policy" / "model.safetensors"))


def test_a_learner_that_raises_mid_round_leaves_no_trace(faulted, sync_run):
    plain, redone = metrics(sync_run["dir"]), metrics(faulted / "faulted")
    assert [m["round"] for m in redone] == [0, 1, 2, 3, 4]  # each round once
    assert redone[-1]["restarts"]["round_retries"] == 1 and redone[-1]["restarts"]["learner"] == 0
    assert plain[-1]["restarts"]["round_retries"] == 0
    assert "injected learner fault after 1 optimizer steps" in (faulted / "faulted.log").read_text()
    assert redone[2]["pairs"] > 0  # round 2 did train, so the failed attempt had stepped
    for a, b in zip(plain[1:], redone[1:]):
        assert b["pairs"] == a["pairs"] and b["prompts_sha"] == a["prompts_sha"]
        assert b["policy_version"] == a["policy_version"]  # versions move once per trained round
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], abs=1e-6)
    w_plain, w_faulted = weights(sync_run["dir"], 4), weights(faulted / "faulted", 4)
    diff = max(float((w_plain[k] - w_faulted[k]).abs().max()) for k in w_plain)
    assert diff < 1e-6, diff
    moved = max(float((w_plain[k] - weights(sync_run["dir"], 2)[k]).abs().max()) for k in w_plain)
    assert moved > 1e-4  # rounds 3-4 did change the weights: the comparison means something


def resume(runs, name, *overrides, allow=False):
    args = [sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", "--resume",
            "--set", f"run.output_dir={runs}", "--set", f"run.name={name}"]
    for o in [*TINY, *BASE, *overrides]:
        args += ["--set", o]
    if allow:
        args.append("--allow-config-change")
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, start_new_session=True)


def test_resume_refuses_a_training_change_unless_allowed_and_records_it(faulted):
    changed = [FAULT, "loop.rounds=5", "learner.beta=0.2"]
    refused = resume(faulted, "faulted", *changed)
    assert refused.returncode == 2
    assert "error: resume: learner.beta changed from 0.1 to 0.2, which alters training" in refused.stderr
    assert [m["round"] for m in metrics(faulted / "faulted")] == [0, 1, 2, 3, 4]

    allowed = resume(faulted, "faulted", *changed, allow=True)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    lines = metrics(faulted / "faulted")
    assert [m["round"] for m in lines] == [0, 1, 2, 3, 4, 5] and lines[-1]["beta"] == pytest.approx(0.2)
    record = json.loads((faulted / "faulted" / "config_changes.jsonl").read_text())
    assert record["allow_config_change"] is True and record["resumed_after"] == "round_000004"
    assert {c["key"]: (c["old"], c["new"]) for c in record["changes"]} == \
        {"learner.beta": (0.1, 0.2), "loop.rounds": (4, 5)}
    assert "beta: 0.2" in (faulted / "faulted" / "config.yaml").read_text()

"""Helpers to run `odpo run` as a real subprocess (its own local Ray cluster) and watch its run dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

# A shrunken demo: few prompts and rounds, small eval set, checkpoints every 2 rounds, and an eager
# engine: vLLM's torch.compile warm-up costs ~40-90 s per engine start on this loaded 2-core machine
# (eager: ~8 s), and every run below starts one or more. The compiled engine stays covered end to
# end by test_rehearsal.py (the rehearsal config, not TINY), the identity run of
# test_dpo_lessons.py and the session's `demo_llm`.
TINY = [
    "loop.prompts_per_round=16", "generator.n=4", "loop.eval_every=2", "data.eval_size=32",
    "loop.checkpoint_every=2", "learner.batch_size=16", "learner.micro_batch_size=16",
    "generator.engine.enforce_eager=true",
]

FIELDS = [
    "round", "policy_version", "prompts", "completions", "pairs", "pairs_dropped", "reward_mean",
    "reward_chosen", "reward_rejected", "loss", "lr", "reward_accuracy", "reward_margin", "kl",
    "gen_tokens_per_s", "gen_s", "judge_s", "learn_s", "sync_s", "round_s", "policy_lag",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_run(out_dir: Path, name: str, *overrides: str, resume: bool = False,
              config: str = "configs/demo.yaml", tiny: bool = True, env: dict | None = None,
              ray_address: str | None = None) -> subprocess.Popen:
    """Start `python -m orchestrator run` in its own session (so its Ray processes can be ended
    with it, by process group); ``tiny`` shrinks it with ``TINY`` first; ``env`` adds environment
    variables. It starts a local cluster of its own, or joins the cluster at ``ray_address``."""
    args = [sys.executable, "-m", "orchestrator", "run", config,
            "--set", f"run.output_dir={out_dir}", "--set", f"run.name={name}"]
    for o in [*(TINY if tiny else ()), *overrides]:
        args += ["--set", o]
    if resume:
        args.append("--resume")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    log = open(out_dir / f"{name}.log", "ab")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def end_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """End the run's whole process group (the driver and the Ray cluster it started)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def wait_for(predicate, proc: subprocess.Popen | None, timeout: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None and not predicate():
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"run exited ({proc.returncode}) before {what}\n{tail}")
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finish(proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_group(proc)
        raise AssertionError(f"run did not finish in {timeout}s\n{log.read_text()[-3000:]}")
    finally:
        end_group(proc)  # the run's Ray processes, if any outlived it
    assert rc == 0, log.read_text()[-4000:]

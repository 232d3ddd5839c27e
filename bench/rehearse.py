"""A rehearsal config run as a new user would: cold vLLM, inductor and Triton caches, then optionally
SIGKILLed right after round K's checkpoint and started again with --resume.

    python bench/rehearse.py configs/rehearsal-1.5b-lora.yaml --model /work/models/rehearsal-1.5b \
        --out /work/r15b --kill-after 2

Prints the log's start-up and checkpoint lines, then one JSON line last: `actors_ready_s` (one per
start), `rounds` (the metrics lines' rounds: each once after a resume), per round the phase seconds
and the peak RSS per process (GB), `wall_s`, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import REPO, machine, read_metrics  # noqa: E402 (after the path)

PHASES = ("gen_s", "judge_s", "learn_s", "sync_s", "eval_s", "round_s", "gen_tokens_per_s", "loss")


def start(config: str, model: str, out: Path, env: dict, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "orchestrator", "run", config, "--set", f"model.path={model}",
            "--set", f"run.output_dir={out}"] + (["--resume"] if resume else [])
    log = open(out / f"{Path(config).stem}.log", "ab")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--model", required=True, help="the rehearsal model's folder (odpo make-rehearsal-model)")
    ap.add_argument("--out", required=True, help="the run's output folder (run.output_dir)")
    ap.add_argument("--kill-after", type=int, default=0, help="SIGKILL after this round's checkpoint, then --resume")
    ap.add_argument("--timeout", type=float, default=7200)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="cold-cache-")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(VLLM_CACHE_ROOT=f"{cache}/vllm", TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor",
               XDG_CACHE_HOME=f"{cache}/xdg", TRITON_CACHE_DIR=f"{cache}/triton")
    name = Path(a.config).stem
    run_dir = out / name
    t0 = time.time()
    proc = start(a.config, a.model, out, env, resume=False)
    try:
        if a.kill_after:
            target = run_dir / "checkpoints" / f"round_{a.kill_after:06d}" / "loop_state.json"
            while not target.exists():
                if proc.poll() is not None:
                    sys.exit(f"exited {proc.returncode} before round {a.kill_after}'s checkpoint")
                if time.time() - t0 > a.timeout:
                    sys.exit(f"no checkpoint of round {a.kill_after} after {a.timeout:.0f}s")
                time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"killed after round {a.kill_after}'s checkpoint at {time.time() - t0:.0f}s", flush=True)
            proc = start(a.config, a.model, out, env, resume=True)
        rc = proc.wait(timeout=max(1.0, a.timeout - (time.time() - t0)))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (out / f"{name}.log").read_text()
    print("\n".join(line for line in log.splitlines()
                    if "actors ready" in line or "resumed from" in line or ("checkpoint" in line and "written" in line)))
    lines = read_metrics(run_dir / "metrics.jsonl")
    print(json.dumps({
        "config": a.config, "exit": rc, "wall_s": round(time.time() - t0, 1),
        "actors_ready_s": [float(x) for x in re.findall(r"actors ready in ([\d.]+)s", log)],
        "rounds": [m["round"] for m in lines],
        "phases": {m["round"]: {k: round(m[k], 3) for k in PHASES if isinstance(m.get(k), (int, float))} for m in lines},
        "rss_peak_gb": {m["round"]: {k: round(v / 1000, 2) for k, v in (m.get("rss_peak_mb") or {}).items()}
                        for m in lines},
        "machine": machine(),
    }))


if __name__ == "__main__":
    main()

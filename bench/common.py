"""Shared by the loop benchmarks: run `odpo run` as a subprocess and read its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_config(name: str, overrides: list[str], config: str = "configs/demo.yaml",
               out_dir: str | None = None, timeout: float = 1800) -> tuple[list[dict], float]:
    """Run one config to the end; returns (metrics lines, wall seconds)."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="odpo-bench-")
    args = [sys.executable, "-m", "orchestrator", "run", config,
            "--set", f"run.output_dir={out_dir}", "--set", f"run.name={name}"]
    for o in overrides:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t = time.time()
    log_path = Path(out_dir) / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.run(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.time() - t
    if proc.returncode != 0:
        sys.stderr.write(log_path.read_text()[-4000:])
        raise SystemExit(f"{name}: odpo run exited {proc.returncode} (log: {log_path})")
    lines = [json.loads(x) for x in (Path(out_dir) / name / "metrics.jsonl").read_text().splitlines()]
    print(f"{name}: {len(lines)} metrics lines in {wall:.0f}s ({log_path})", file=sys.stderr)
    return lines, wall


def mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None

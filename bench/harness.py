"""Shared by the benches: run `odpo run` as a subprocess and read its metrics; the machine a figure was measured on."""

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
               out_dir: str | None = None, timeout: float = 1800, reuse: bool = False) -> tuple[list[dict], float]:
    """Run one config to the end; returns (metrics lines, wall seconds).

    With ``reuse``, a run already finished in ``out_dir`` (its wall time recorded in
    ``<name>.done.json`` next to it) is read back instead of run again: a long bench that was
    interrupted picks up where it stopped.
    """
    out_dir = out_dir or tempfile.mkdtemp(prefix="odpo-bench-")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    done = Path(out_dir) / f"{name}.done.json"
    metrics_path = Path(out_dir) / name / "metrics.jsonl"
    if reuse and done.exists() and json.loads(done.read_text()).get("overrides") == overrides:
        wall = json.loads(done.read_text())["wall_s"]
        print(f"{name}: reusing the finished run in {out_dir} ({wall:.0f}s)", file=sys.stderr)
        return read_metrics(metrics_path), wall
    if (Path(out_dir) / name).exists():  # a half-finished earlier attempt: start clean, not resume
        import shutil

        shutil.rmtree(Path(out_dir) / name)
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
    lines = read_metrics(metrics_path)
    done.write_text(json.dumps({"overrides": overrides, "wall_s": wall}) + "\n")
    print(f"{name}: {len(lines)} metrics lines in {wall:.0f}s ({log_path})", file=sys.stderr)
    return lines, wall


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def evals(lines: list[dict]) -> list[tuple[int, float]]:
    """The run's (round, eval_reward) points, round 0 first."""
    return [(m["round"], m["eval_reward"]) for m in lines if m.get("eval_reward") is not None]


def last3(lines: list[dict]) -> float:
    """Mean of the last 3 eval points (single points swing by a few hundredths)."""
    return mean([v for _, v in evals(lines)[-3:]])


def mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


def machine() -> dict:
    """What a figure was measured on: CPU model, cores and the instruction sets that decide the
    speed of bf16 and fp32 paths (every bench puts this in its JSON line)."""
    import platform

    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "f16c")
    return {"cpu": model, "cores": os.cpu_count(), "cpu_flags": [f for f in wanted if f in flags]}

"""Soak: the demo loop for many rounds, checking that no process's memory creeps and no pair is lost.

Runs ``configs/demo.yaml`` for ``--rounds`` rounds (default 50; eval every 10, checkpoint every
10) and reads the per-round ``rss_mb`` of the driver and of every actor from ``metrics.jsonl``.
For each process: the peak RSS in an early window (rounds 5-10, after the engines have warmed
up) and in the last six rounds (45-50), and its growth between the two as a fraction.
``rss_growth`` is the largest growth (goal < 0.10). ``pairs_written`` counts the rows of
``pairs/*.parquet``; ``pairs_expected`` sums the metrics' ``pairs``: they must be equal.

``--service`` (default 200 rounds) runs the loop as a service instead (bench/soak_service.py):
10 inbox batches of 40 prompts added while it runs (by ``odpo add-prompts`` and ``POST
/prompts`` in turn), a pause held 15 s then a resume, and three ``set`` calls; on top of the
figures above it checks that every inbox prompt was sampled exactly once and that each change
shows in the rounds after it.

    .venv/bin/python bench/soak.py [--rounds 50] [--keep DIR] [--service]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from harness import machine, run_config
from soak_service import run_service

EARLY = (5, 10)
"""Rounds of the early window (inclusive): round 1-4 still warm caches and allocator pools."""


def window_peaks(lines: list[dict], first: int, last: int) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for m in lines:
        if first <= m.get("round", 0) <= last:
            for name, mb in (m.get("rss_mb") or {}).items():
                peaks[name] = max(peaks.get(name, 0.0), mb)
    return peaks


def pairs_written(run_dir: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in sorted((run_dir / "pairs").glob("round_*.parquet")))


def soak_figures(lines: list[dict], rounds: int, run_dir: Path) -> dict:
    """Memory per process (early window vs the last six rounds), and pairs written vs reported."""
    trained = [m for m in lines if m.get("round", 0) >= 1 and "pairs" in m]
    got = [m["round"] for m in trained]
    if got != list(range(1, rounds + 1)):
        print(f"soak: metrics rounds are {got}", file=sys.stderr)
    late = (rounds - 5, rounds)
    early_peak, late_peak = window_peaks(trained, *EARLY), window_peaks(trained, *late)
    growth = {name: round((late_peak[name] - mb) / mb, 4)
              for name, mb in early_peak.items() if name in late_peak and mb > 0}
    worst = max(growth, key=growth.get) if growth else None
    written, expected = pairs_written(run_dir), sum(m["pairs"] for m in trained)
    return {
        "rounds": rounds, "rounds_logged": len(trained), "rounds_once_each": got == list(range(1, rounds + 1)),
        "round_s_mean": round(sum(m["round_s"] for m in trained) / len(trained), 3),
        f"rss_peak_mb_rounds_{EARLY[0]}_{EARLY[1]}": early_peak,
        f"rss_peak_mb_rounds_{late[0]}_{late[1]}": late_peak,
        "rss_growth_by_process": growth,
        "rss_growth": growth.get(worst), "rss_growth_process": worst,
        "pairs_written": written, "pairs_expected": expected, "pairs_match": written == expected,
        "restarts": trained[-1].get("restarts") if trained else None,
        "run_dir": str(run_dir),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=None, help="default 50; with --service 200")
    ap.add_argument("--keep", help="run directory parent to keep (default: a temp folder)")
    ap.add_argument("--service", action="store_true", help="inbox batches, a pause and set calls while it runs")
    args = ap.parse_args()
    rounds = args.rounds or (200 if args.service else 50)
    if rounds < (200 if args.service else 16):
        raise SystemExit("--rounds must be >= 16 (two 6-round windows apart); with --service >= 200")
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="odpo-soak-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = [f"loop.rounds={rounds}", "loop.eval_every=10", "loop.checkpoint_every=10"]
    if args.service:
        lines, wall, service = run_service("soak-service", overrides, out_dir, rounds)
        print(json.dumps({"bench": "soak-service", "wall_s": round(wall, 1),
                          **soak_figures(lines, rounds, out_dir / "soak-service"), **service, "machine": machine()}))
        return
    lines, wall = run_config("soak", overrides, out_dir=str(out_dir), timeout=7200)
    print(json.dumps({"bench": "soak", "wall_s": round(wall, 1), **soak_figures(lines, rounds, out_dir / "soak"),
                      "machine": machine()}))


if __name__ == "__main__":
    main()

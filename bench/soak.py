"""Soak: the demo loop for many rounds, checking that no process's memory creeps and no pair is lost.

Runs ``configs/demo.yaml`` for ``--rounds`` rounds (default 50; eval every 10, checkpoint every
10) and reads the per-round ``rss_mb`` of the driver and of every actor from ``metrics.jsonl``.
For each process: the peak RSS in an early window (rounds 5-10, after the engines have warmed
up) and in the last six rounds (45-50), and its growth between the two as a fraction.
``rss_growth`` is the largest growth (goal < 0.10). ``pairs_written`` counts the rows of
``pairs/*.parquet``; ``pairs_expected`` sums the metrics' ``pairs``: they must be equal.

    .venv/bin/python bench/soak.py [--rounds 50] [--keep DIR]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from harness import run_config

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--keep", help="run directory parent to keep (default: a temp folder)")
    args = ap.parse_args()
    if args.rounds < 16:
        raise SystemExit("--rounds must be >= 16 (two 6-round windows apart)")
    out_dir = args.keep or tempfile.mkdtemp(prefix="odpo-soak-")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lines, wall = run_config("soak", [f"loop.rounds={args.rounds}", "loop.eval_every=10",
                                       "loop.checkpoint_every=10"], out_dir=out_dir, timeout=7200)
    trained = [m for m in lines if m.get("round", 0) >= 1 and "pairs" in m]
    rounds = [m["round"] for m in trained]
    if rounds != list(range(1, args.rounds + 1)):
        print(f"soak: metrics rounds are {rounds}", file=sys.stderr)
    late = (args.rounds - 5, args.rounds)
    early_peak, late_peak = window_peaks(trained, *EARLY), window_peaks(trained, *late)
    growth = {name: round((late_peak[name] - mb) / mb, 4)
              for name, mb in early_peak.items() if name in late_peak and mb > 0}
    worst = max(growth, key=growth.get) if growth else None
    written, expected = pairs_written(Path(out_dir) / "soak"), sum(m["pairs"] for m in trained)
    print(json.dumps({
        "bench": "soak", "rounds": args.rounds, "rounds_logged": len(trained),
        "rounds_once_each": rounds == list(range(1, args.rounds + 1)),
        "wall_s": round(wall, 1), "round_s_mean": round(sum(m["round_s"] for m in trained) / len(trained), 3),
        f"rss_peak_mb_rounds_{EARLY[0]}_{EARLY[1]}": early_peak,
        f"rss_peak_mb_rounds_{late[0]}_{late[1]}": late_peak,
        "rss_growth_by_process": growth,
        "rss_growth": growth.get(worst), "rss_growth_process": worst,
        "pairs_written": written, "pairs_expected": expected, "pairs_match": written == expected,
        "restarts": trained[-1].get("restarts") if trained else None,
        "run_dir": str(Path(out_dir) / "soak"),
    }))


if __name__ == "__main__":
    main()

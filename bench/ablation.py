"""What does each loss term add, at a fair learning rate? The demo config, three losses × a grid of
learning rates, all on the same seed.

- `dpo`: DPO only (`rpo_alpha: 0`)
- `dpo_nll`: DPO + NLL on the chosen answer (`rpo_alpha: 1`; the demo default)
- `nll`: NLL on the chosen answer only (`dpo_weight: 0`)

Each cell reports the held-out greedy accuracy (all 500 eval prompts) at round 0 and every
`--eval-every` rounds, and the mean of its last 3 eval points (single points swing by a few
hundredths). Each variant's best lr is the one with the highest mean of the last 3 evals.

    .venv/bin/python bench/ablation.py [--rounds 40] [--lrs 1e-5,3e-5,1e-4] [--out DIR]
    .venv/bin/python bench/ablation.py --quick      # CI-sized: lrs 3e-5 and 1e-4, 2 rounds of 32 prompts, 100 eval prompts

`--out DIR` keeps every run there and reuses the cells already finished (an interrupted sweep
picks up where it stopped). The full sweep is 9 demo runs one after another: about 20 min on an
idle 2-core machine (see bench/README.md for the measured time).
"""

import argparse
import json
import time

from harness import evals, last3, run_config

VARIANTS = {
    "dpo": ["learner.rpo_alpha=0", "learner.dpo_weight=1"],
    "dpo_nll": ["learner.rpo_alpha=1", "learner.dpo_weight=1"],
    "nll": ["learner.rpo_alpha=1", "learner.dpo_weight=0"],
}
QUICK = ["loop.prompts_per_round=32", "data.eval_size=100"]


def lr_key(lr: float) -> str:
    return f"{lr:g}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--lrs", default=None, help="comma-separated grid (default 1e-5,3e-5,1e-4; --quick: 3e-5,1e-4)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep the runs here and reuse finished ones")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 2 lrs, 2 rounds of 32 prompts, 100 eval prompts")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every cell")
    args = ap.parse_args()
    rounds, eval_every, extra = args.rounds, args.eval_every, list(args.set)
    if args.quick:
        rounds, eval_every, extra = 2, 1, [*QUICK, *extra]
    lrs = [float(x) for x in (args.lrs or ("3e-5,1e-4" if args.quick else "1e-5,3e-5,1e-4")).split(",")]
    t0 = time.time()
    cells: dict = {}
    for name in args.variants.split(","):
        for lr in lrs:
            overrides = [*VARIANTS[name], f"learner.lr={lr}", f"run.seed={args.seed}", f"loop.rounds={rounds}",
                         f"loop.eval_every={eval_every}", "loop.checkpoint_every=0", *extra]
            lines, wall = run_config(f"ablation-{name}-lr{lr_key(lr)}-s{args.seed}", overrides,
                                     out_dir=args.out, reuse=args.out is not None)
            points = evals(lines)
            cells.setdefault(name, {})[lr_key(lr)] = {
                "eval_start": round(points[0][1], 3), "eval_last3": round(last3(lines), 3),
                "evals": [[r, round(v, 3)] for r, v in points], "wall_s": round(wall),
            }
    best = {}
    for name, by_lr in cells.items():
        lr = max(by_lr, key=lambda k: by_lr[k]["eval_last3"])
        best[name] = {"lr": float(lr), "eval_last3": by_lr[lr]["eval_last3"],
                      "gain": round(by_lr[lr]["eval_last3"] - by_lr[lr]["eval_start"], 3)}
    for name, by_lr in cells.items():
        print(f"{name:8s} " + "  ".join(f"lr {k}: {v['eval_start']:.3f} -> {v['eval_last3']:.3f}"
                                        for k, v in by_lr.items()) + f"   best lr {best[name]['lr']:g}")
    out = {"bench": "ablation", "rounds": rounds, "eval_every": eval_every, "seed": args.seed,
           "quick": args.quick, "lrs": lrs, "best": best, "cells": cells, "wall_s": sum(c["wall_s"] for by_lr in cells.values() for c in by_lr.values()),
           "bench_s": round(time.time() - t0)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

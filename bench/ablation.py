"""What does each loss term add, at a fair learning rate? A demo task, three losses × a grid of
learning rates on one seed, then each loss at its best lr on the other seeds.

- `dpo`: DPO only (`rpo_alpha: 0`)
- `dpo_nll`: DPO + NLL on the chosen answer (`rpo_alpha: 1`; the demo default)
- `nll`: NLL on the chosen answer only (`dpo_weight: 0`): imitating the best of n samples

Every run has the same samples per round, pairs rule and batch size, so the same number of pairs
and optimizer steps up to the pairs a tie drops (reported per run). `--task` picks the demo:
`addition` (configs/demo.yaml, 0/1 rewards; the default) or `graded` (configs/demo-graded.yaml,
3-digit sums scored digit by digit). Each cell reports the held-out greedy reward (all 500 eval
prompts) at round 0 and every `--eval-every` rounds, and the mean of its last 3 eval points
(single points swing by a few hundredths). Each loss's best lr is the one with the highest mean
of the last 3 evals on the first seed; the other seeds run at that lr, the same rule for every
loss. `dpo_minus_nll` is the better of `dpo` and `dpo_nll` minus `nll`, mean over the seeds.

    .venv/bin/python bench/ablation.py [--task addition] [--rounds 40] [--lrs 1e-5,3e-5,1e-4] [--seeds 0] [--out DIR]
    .venv/bin/python bench/ablation.py --task graded --seeds 0,1,2 --out runs/ablation-graded   # docs/experiments.md
    .venv/bin/python bench/ablation.py --quick      # CI-sized: lrs 3e-5 and 1e-4, 2 rounds of 32 prompts, 100 eval prompts

`--out DIR` keeps every run there and reuses the cells already finished (an interrupted sweep
picks up where it stopped). `--chart PNG` draws each loss's eval curve at its best lr, one line a
seed. The grid on one seed is 9 demo runs one after another: about 20 min on an idle 2-core
machine (see bench/README.md for the measured times).
"""

import argparse
import json
import math
import time
from pathlib import Path

from harness import REPO, evals, last3, machine, mean, run_config

VARIANTS = {
    "dpo": ["learner.rpo_alpha=0", "learner.dpo_weight=1"],
    "dpo_nll": ["learner.rpo_alpha=1", "learner.dpo_weight=1"],
    "nll": ["learner.rpo_alpha=1", "learner.dpo_weight=0"],
}
TITLES = {"dpo": "DPO only", "dpo_nll": "DPO + NLL on chosen", "nll": "NLL on chosen only"}
TASKS = {"addition": ("configs/demo.yaml", "ablation"), "graded": ("configs/demo-graded.yaml", "ablation-graded")}
"""Each task's config and run-name prefix (the addition runs keep their old names, so an old
``--out`` folder is still reused)."""
QUICK = ["loop.prompts_per_round=32", "data.eval_size=100"]


def lr_key(lr: float) -> str:
    return f"{lr:g}"


def cell(lines: list[dict], wall: float, batch_size: int) -> dict:
    points, trained = evals(lines), [m for m in lines if m["round"] >= 1]
    return {"eval_start": round(points[0][1], 3), "eval_last3": round(last3(lines), 3),
            "evals": [[r, round(v, 3)] for r, v in points], "wall_s": round(wall),
            "pairs": sum(m["pairs"] for m in trained),
            "steps": sum(math.ceil(m["pairs"] / batch_size) for m in trained)}


def chart(cells: dict, best: dict, seeds: list[int], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, b), color in zip(best.items(), ("tab:blue", "tab:green", "tab:red")):
        for i, seed in enumerate(seeds):
            xs, ys = zip(*cells[name][str(seed)][lr_key(b["lr"])]["evals"])
            label = f"{TITLES[name]}, lr {b['lr']:g} (last 3, mean of seeds: {b['eval_last3']:.3f})" if i == 0 else None
            ax.plot(xs, ys, "-o", color=color, alpha=0.85, markersize=3, linewidth=1.2, label=label)
    ax.set_xlabel("round (256 prompts x 8 samples, best-vs-worst pairs)")
    ax.set_ylabel("held-out greedy reward (500 prompts)")
    ax.set_title(f"{task} task: each loss at its best lr, {len(seeds)} seed(s) each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=tuple(TASKS), default="addition")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--lrs", default=None, help="comma-separated grid (default 1e-5,3e-5,1e-4; --quick: 3e-5,1e-4)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0", help="comma-separated; the lr grid runs on the first, the rest at each loss's best lr")
    ap.add_argument("--out", default=None, help="keep the runs here and reuse finished ones")
    ap.add_argument("--chart", default=None, help="write the eval curves at the best lrs to this PNG")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 2 lrs, 2 rounds of 32 prompts, 100 eval prompts")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every cell")
    args = ap.parse_args()
    rounds, eval_every, extra = args.rounds, args.eval_every, list(args.set)
    if args.quick:
        rounds, eval_every, extra = 2, 1, [*QUICK, *extra]
    lrs = [float(x) for x in (args.lrs or ("3e-5,1e-4" if args.quick else "1e-5,3e-5,1e-4")).split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    config, prefix = TASKS[args.task]
    batch_size = 64  # both demo configs' learner.batch_size, unless --set changes it
    for o in extra:
        if o.startswith("learner.batch_size="):
            batch_size = int(o.partition("=")[2])
    t0 = time.time()
    cells: dict = {}

    def run(name: str, lr: float, seed: int) -> dict:
        overrides = [*VARIANTS[name], f"learner.lr={lr}", f"run.seed={seed}", f"loop.rounds={rounds}",
                     f"loop.eval_every={eval_every}", "loop.checkpoint_every=0", *extra]
        lines, wall = run_config(f"{prefix}-{name}-lr{lr_key(lr)}-s{seed}", overrides, config=config,
                                 out_dir=args.out, reuse=args.out is not None)
        c = cells.setdefault(name, {}).setdefault(str(seed), {})[lr_key(lr)] = cell(lines, wall, batch_size)
        return c

    for name in names:
        for lr in lrs:
            run(name, lr, seeds[0])
    best = {}
    for name in names:
        by_lr = cells[name][str(seeds[0])]
        lr = float(max(by_lr, key=lambda k: by_lr[k]["eval_last3"]))
        per_seed = {str(s): run(name, lr, s) for s in seeds}
        start = mean([c["eval_start"] for c in per_seed.values()])
        best[name] = {"lr": lr, "eval_last3": round(mean([c["eval_last3"] for c in per_seed.values()]), 3),
                      "gain": round(mean([c["eval_last3"] for c in per_seed.values()]) - start, 3),
                      "by_seed": {s: c["eval_last3"] for s, c in per_seed.items()},
                      "pairs": {s: c["pairs"] for s, c in per_seed.items()},
                      "steps": {s: c["steps"] for s, c in per_seed.items()}}
    for name in names:
        print(f"{name:8s} " + "  ".join(f"lr {k}: {v['eval_start']:.3f} -> {v['eval_last3']:.3f}"
                                        for k, v in cells[name][str(seeds[0])].items())
              + f"   best lr {best[name]['lr']:g}: " + " / ".join(f"{v:.3f}" for v in best[name]["by_seed"].values())
              + f" (mean {best[name]['eval_last3']:.3f})")
    out = {"bench": "ablation", "task": args.task, "rounds": rounds, "eval_every": eval_every, "seeds": seeds,
           "quick": args.quick, "lrs": lrs, "best": best}
    dpo_side = [n for n in ("dpo", "dpo_nll") if n in best]
    if dpo_side and "nll" in best:
        top = max(dpo_side, key=lambda n: best[n]["eval_last3"])
        out["best_dpo_variant"] = top
        out["dpo_minus_nll"] = round(best[top]["eval_last3"] - best["nll"]["eval_last3"], 3)
        out["dpo_minus_nll_by_seed"] = {s: round(v - best["nll"]["by_seed"][s], 3) for s, v in best[top]["by_seed"].items()}
    if args.chart:
        chart(cells, best, seeds, args.task, REPO / args.chart)
        out["chart"] = args.chart
    out.update({"cells": cells, "wall_s": sum(c["wall_s"] for by_seed in cells.values() for by_lr in by_seed.values()
                                              for c in by_lr.values()),
                "bench_s": round(time.time() - t0), "machine": machine()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()

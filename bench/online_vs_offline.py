"""What does sampling the current policy buy? Online, iterative and offline DPO at equal budget on
the demo task: same seed, same prompts in the same order, same n, judge and pair selection, same
batch size, one pass over each round's pairs.

- `online`: odpo's loop as configured: every round samples the current policy (`loop.regenerate_every: 1`).
- `iterative` (the RLHFlow recipe): `--iterations` K windows; the first round of each samples the
  policy from the end of the previous window for all the window's prompts, then the window's
  rounds train on them in order (`loop.regenerate_every: rounds/K`).
- `offline`: the initial policy is sampled once for every prompt the run will draw, then trained on
  round by round without regenerating (`loop.regenerate_every: rounds`).

All three are the same `odpo run` (the same generator pool, judges and learner; see
orchestrator/loop/regenerate.py), each with DPO only (`rpo_alpha: 0`) and DPO + NLL (`rpo_alpha: 1`),
at the learning rate bench/ablation.py found best for that loss. Round 1 of every variant samples
the same policy with the same seeds, so its pairs are identical across variants (checked:
`round1_identical`); every round draws the same prompts (checked: `same_prompts`). The pairs and
optimizer steps of each run are reported: they differ a little, because a prompt whose n answers
are all right or all wrong makes no pair and the policies that sample differ. So each online and
iterative run is also scored at the step count of the offline run of its loss (`at_offline_steps`:
the mean of its 3 evals ending at its last eval round within that many steps), and
`online_minus_offline_<loss>_equal_steps` compares that with offline.

    .venv/bin/python bench/online_vs_offline.py [--lr-dpo 3e-5] [--lr-dpo-nll 1e-4] [--out DIR]
    .venv/bin/python bench/online_vs_offline.py --quick     # CI-sized: DPO only, 4 rounds of 32 prompts
    # pure DPO tuned as configs/demo-dpo.yaml (docs/experiments.md's "tuned" row; about 15 min):
    .venv/bin/python bench/online_vs_offline.py --losses dpo --lr-dpo 5e-5 --batch-size 256 \
        --set loop.prompts_per_round=1024 --set learner.micro_batch_size=64 --set learner.ref_refresh_every=1 \
        --set learner.lr_schedule=cosine --set learner.min_lr_ratio=0.1 --chart /tmp/ovo-tuned.png

Prints a table, writes the chart (`--chart`, default docs/online-vs-offline.png) and one JSON line last.
Six demo runs one after another: about 15 min on an idle 2-core machine.
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from harness import REPO, evals, last3, run_config

LOSSES = {"dpo": ["learner.rpo_alpha=0", "learner.dpo_weight=1"],
          "dpo_nll": ["learner.rpo_alpha=1", "learner.dpo_weight=1"]}
SCHEDULES = ("online", "iterative", "offline")
QUICK = ["loop.prompts_per_round=32", "data.eval_size=100"]


def regenerate_every(schedule: str, rounds: int, iterations: int) -> int:
    if schedule == "online":
        return 1
    if schedule == "offline":
        return rounds
    if rounds % iterations:
        raise SystemExit(f"--iterations {iterations} must divide --rounds {rounds}")
    return rounds // iterations


def summarize(lines: list[dict], batch_size: int) -> dict:
    points = evals(lines)
    trained = [m for m in lines if m["round"] >= 1]
    return {
        "eval_start": round(points[0][1], 3), "eval_last3": round(last3(lines), 3),
        "gain": round(last3(lines) - points[0][1], 3),
        "evals": [[r, round(v, 3)] for r, v in points],
        "pairs": sum(m["pairs"] for m in trained),
        "steps": sum(math.ceil(m["pairs"] / batch_size) for m in trained),
        "steps_by_round": {m["round"]: sum(math.ceil(x["pairs"] / batch_size) for x in trained[:i + 1])
                           for i, m in enumerate(trained)},
        "max_policy_lag": max((m["policy_lag"] for m in trained), default=0),
        "prompts_sha": [m["prompts_sha"] for m in trained],
        "round1": (trained[0]["pairs"], trained[0]["reward_mean"]) if trained else None,
    }


def at_steps(run: dict, steps: int) -> tuple[int, float]:
    """The mean of the 3 evals of ``run`` ending at its last eval round that took at most ``steps``
    optimizer steps, and that round: ``run`` compared with a run that took only ``steps`` in all."""
    points = [(r, v) for r, v in run["evals"] if r == 0 or run["steps_by_round"][r] <= steps]
    return points[-1][0], round(sum(v for _, v in points[-3:]) / len(points[-3:]), 3)


def chart(results: dict, lrs: dict, losses: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(losses), figsize=(5.5 * len(losses), 4), sharey=True, squeeze=False)
    axes = axes[0]
    titles = {"dpo": "DPO only", "dpo_nll": "DPO + NLL on chosen"}
    for ax, loss in zip(axes, losses):
        for schedule, style in zip(SCHEDULES, ("-o", "--s", ":^")):
            res = results[f"{schedule}_{loss}"]
            xs, ys = zip(*res["evals"])
            ax.plot(xs, ys, style, markersize=4, label=f"{schedule} (last 3: {res['eval_last3']:.3f})")
        ax.set_title(f"{titles[loss]}, lr {lrs[loss]:g}")
        ax.set_xlabel("round (256 prompts, one pass over its pairs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel("held-out greedy accuracy (500 prompts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=4, help="iterative DPO: number of sampling windows")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--lr-dpo", type=float, default=3e-5, help="DPO only: the ablation's best lr")
    ap.add_argument("--lr-dpo-nll", type=float, default=1e-4, help="DPO + NLL: the ablation's best lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="keep the runs here and reuse finished ones")
    ap.add_argument("--chart", default=None, help="default docs/online-vs-offline.png (--quick: a temp file)")
    ap.add_argument("--losses", default=None, help="comma-separated subset of dpo,dpo_nll (default both; --quick: dpo)")
    ap.add_argument("--quick", action="store_true", help="CI-sized: DPO only, 4 rounds of 32 prompts, 2 iterations")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    args = ap.parse_args()
    rounds, iterations, eval_every, extra = args.rounds, args.iterations, args.eval_every, list(args.set)
    if args.quick:
        rounds, iterations, eval_every, extra = 4, 2, 1, [*QUICK, *extra]
    lrs = {"dpo": args.lr_dpo, "dpo_nll": args.lr_dpo_nll}
    chart_path = Path(args.chart or (tempfile.mkdtemp(prefix="odpo-ovo-") + "/online-vs-offline.png" if args.quick
                                     else REPO / "docs" / "online-vs-offline.png"))
    losses = (args.losses or ("dpo" if args.quick else "dpo,dpo_nll")).split(",")
    t0 = time.time()
    results = {}
    for loss in losses:
        for schedule in SCHEDULES:
            k = regenerate_every(schedule, rounds, iterations)
            overrides = [*LOSSES[loss], f"learner.lr={lrs[loss]}", f"run.seed={args.seed}",
                         f"loop.rounds={rounds}", f"loop.eval_every={eval_every}", f"loop.regenerate_every={k}",
                         "loop.checkpoint_every=0", f"learner.batch_size={args.batch_size}",
                         f"learner.micro_batch_size={args.batch_size}", "learner.epochs_per_round=1", *extra]
            lines, wall = run_config(f"ovo-{schedule}-{loss}-s{args.seed}", overrides, out_dir=args.out,
                                     reuse=args.out is not None)
            results[f"{schedule}_{loss}"] = {**summarize(lines, args.batch_size), "regenerate_every": k,
                                             "wall_s": round(wall)}
    for loss in losses:  # equal steps: online cut at the steps offline took (it made fewer pairs)
        offline = results[f"offline_{loss}"]
        for schedule in ("online", "iterative"):
            r, v = at_steps(results[f"{schedule}_{loss}"], offline["steps"])
            results[f"{schedule}_{loss}"]["at_offline_steps"] = {"round": r, "eval_last3": v}
    for r in results.values():
        r.pop("steps_by_round")
    same_prompts = len({tuple(r.pop("prompts_sha")) for r in results.values()}) == 1
    round1_identical = len({r.pop("round1") for r in results.values()}) == 1
    chart(results, lrs, losses, chart_path)
    for name, r in results.items():
        print(f"{name:18s} {r['eval_start']:.3f} -> {r['eval_last3']:.3f} (gain {r['gain']:+.3f})  "
              f"pairs {r['pairs']} steps {r['steps']} max lag {r['max_policy_lag']}")

    def diff(a, b):
        return round(results[a]["eval_last3"] - results[b]["eval_last3"], 3)

    out = {"bench": "online_vs_offline", "rounds": rounds, "iterations": iterations, "eval_every": eval_every,
           "seed": args.seed, "quick": args.quick, "lr": lrs,
           **({"dpo_gain": results["online_dpo"]["gain"]} if "dpo" in losses else {}),
           **{f"{a}_minus_{b}_{loss}": diff(f"{a}_{loss}", f"{b}_{loss}") for loss in losses
              for a, b in (("online", "offline"), ("online", "iterative"), ("iterative", "offline"))},
           **{f"online_minus_offline_{loss}_equal_steps": round(
               results[f"online_{loss}"]["at_offline_steps"]["eval_last3"] - results[f"offline_{loss}"]["eval_last3"], 3)
              for loss in losses},
           "same_prompts": same_prompts, "round1_identical": round1_identical,
           "runs": results, "chart": str(chart_path.resolve().relative_to(REPO)) if chart_path.resolve().is_relative_to(REPO) else str(chart_path),
           "wall_s": sum(r["wall_s"] for r in results.values()), "bench_s": round(time.time() - t0)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

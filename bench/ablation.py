"""What does the DPO term add? The demo config run three ways on the same seed.

- `dpo`: DPO only (rpo_alpha 0)
- `dpo_nll`: DPO + NLL on the chosen answer (rpo_alpha 1; the demo default)
- `nll`: NLL on chosen only (dpo_weight 0)

Each reports the held-out greedy accuracy (all 500 eval prompts) as the mean of its last 3 eval
points (single-point accuracy swings by about ±0.05), and the round-0 accuracy.

    .venv/bin/python bench/ablation.py [--rounds 40]
"""

import argparse
import json

from common import mean, run_config

VARIANTS = {
    "dpo": ["learner.rpo_alpha=0", "learner.dpo_weight=1"],
    "dpo_nll": ["learner.rpo_alpha=1", "learner.dpo_weight=1"],
    "nll": ["learner.rpo_alpha=1", "learner.dpo_weight=0"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=5)
    args = ap.parse_args()
    out = {"bench": "ablation", "rounds": args.rounds}
    for name, overrides in VARIANTS.items():
        lines, wall = run_config(f"ablation-{name}", [*overrides, f"loop.rounds={args.rounds}",
                                                      f"loop.eval_every={args.eval_every}", "loop.checkpoint_every=0"])
        evals = [m["eval_reward"] for m in lines if "eval_reward" in m]
        out[f"{name}_eval_start"] = round(evals[0], 3)
        out[f"{name}_eval_last3"] = round(mean(evals[-3:]), 3)
        out[f"{name}_wall_s"] = round(wall)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

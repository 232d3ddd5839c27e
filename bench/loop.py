"""Loop overhead and the async speed-up, measured on the demo model in one run.

Sync mode: mean round seconds and its parts (gen, judge, learn, sync), and the share of round
time that is none of them (`overhead_share`, goal <= 0.05). Then the same config in async mode
(`async_vs_sync` = async round s / sync round s, goal <= 0.7), on settings where generation and
training take similar time. Round 1 is left out of the means (engine warm-up).

    .venv/bin/python bench/loop.py [--rounds 8]
"""

import argparse
import json

from harness import mean, run_config

# Balanced for the 2-core demo box: ~equal sampling and learning time per round.
BALANCED = ["loop.eval_every=0", "loop.checkpoint_every=0", "loop.prompts_per_round=256",
            "generator.n=8", "learner.epochs_per_round=4", "learner.batch_size=32", "learner.micro_batch_size=32"]


def summarize(lines):
    rounds = [m for m in lines if m["round"] >= 2]
    parts = {k: mean([m[k] for m in rounds]) for k in ("gen_s", "judge_s", "learn_s", "sync_s", "round_s")}
    overhead = mean([(m["round_s"] - m["gen_s"] - m["judge_s"] - m["learn_s"] - m["sync_s"]) / m["round_s"]
                     for m in rounds])
    return parts, overhead


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    common = [*BALANCED, f"loop.rounds={args.rounds}"]
    sync_lines, _ = run_config("bench-sync", [*common, "loop.mode=sync"])
    async_lines, _ = run_config("bench-async", [*common, "loop.mode=async"])
    sync_parts, overhead = summarize(sync_lines)
    async_parts, _ = summarize(async_lines)
    print(json.dumps({
        "bench": "loop", "rounds": args.rounds,
        "sync_round_s": round(sync_parts["round_s"], 3),
        **{f"sync_{k}": round(v, 3) for k, v in sync_parts.items() if k != "round_s"},
        "overhead_share": round(overhead, 4),
        "async_round_s": round(async_parts["round_s"], 3),
        "async_vs_sync": round(async_parts["round_s"] / sync_parts["round_s"], 3),
    }))


if __name__ == "__main__":
    main()

"""Learner throughput: our DPO learner against TRL's ``DPOTrainer``, side by side in one run.

Same tiny model (the demo), same pairs (demo prompts, chosen = the right sum, rejected = a near
miss), same batch size, epochs, learning rate and thread count, on this machine. Tokens are
counted the same way for both: the non-pad tokens of the prompt+chosen and prompt+rejected
sequences of every pair in every step (the ids are identical on both sides; see
tests/integration/test_trl_crosscheck.py). Timed for each side: tokenizing, reference log-probs
and the optimizer steps (our ``LearnerGroup.train`` call through Ray; TRL's trainer construction
from loaded models plus ``train()``), not model loading or actor start-up. Each side runs
``--repeats`` times, interleaved, and its best time counts (the machine is shared).

    .venv/bin/python bench/learner.py [--pairs 256 --batch-size 32 --epochs 2 --threads 1]

Prints one JSON line last: ``odpo_tokens_per_s``, ``trl_tokens_per_s`` (TRL defaults: reference
forward every step), ``trl_precompute_tokens_per_s`` (TRL with ``precompute_ref_log_probs``),
``vs_trl`` = ours / TRL default and ``vs_trl_precompute``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

DEMO_MODEL = REPO / "assets" / "demo" / "model"
DEMO_TRAIN = REPO / "assets" / "demo" / "data" / "train.jsonl"


def demo_pairs(n: int):
    from common.types import PreferencePair

    rows = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:n]]
    deltas = [1, -1, 10, -10]
    return [PreferencePair(r["prompt"], r["answer"], str(int(r["answer"]) + deltas[i % 4]), 1.0, 0.0, r)
            for i, r in enumerate(rows)]


def run_trl(pairs, args, *, precompute: bool, out_dir: str) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    policy = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    reference = None if precompute else AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    data = Dataset.from_dict({"prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs],
                              "rejected": [p.rejected for p in pairs]})
    config = DPOConfig(
        output_dir=out_dir, report_to=[], use_cpu=True, bf16=False, beta=args.beta, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, num_train_epochs=args.epochs,
        max_length=None, save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        precompute_ref_log_probs=precompute, seed=0,
    )
    start = time.perf_counter()
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=data, processing_class=tok)
    trainer.train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()

    import ray
    import torch
    from transformers import AutoTokenizer

    from actors.learner.batching import tokenize_pairs
    from actors.learner.group import LearnerGroup
    from orchestrator.config import LearnerConfig, ModelConfig

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    pairs = demo_pairs(args.pairs)
    kept, _ = tokenize_pairs(AutoTokenizer.from_pretrained(DEMO_MODEL), pairs, chat_template=False, max_len=64)
    tokens = args.epochs * sum(p.tokens for p in kept)
    steps = args.epochs * -(-len(kept) // args.batch_size)

    ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
    model_cfg = ModelConfig(path=str(DEMO_MODEL), max_model_len=64)
    learner_cfg = LearnerConfig(num_workers=1, num_cpus_per_worker=args.threads, batch_size=args.batch_size,
                                micro_batch_size=args.batch_size, epochs_per_round=args.epochs, lr=args.lr,
                                beta=args.beta)
    group = LearnerGroup(model_cfg, learner_cfg, seed=0)
    init = tempfile.mkdtemp(prefix="odpo-bench-")
    group.save(init)
    ours, trl, trl_pre = [], [], []
    try:
        for r in range(args.repeats):
            group.load(init)  # every repeat trains the same model on the same pairs
            start = time.perf_counter()
            report = group.train(pairs, round=1)
            ours.append(time.perf_counter() - start)
            assert report["steps"] == steps and report["tokens"] == tokens, report
            with tempfile.TemporaryDirectory() as out:
                trl.append(run_trl(pairs, args, precompute=False, out_dir=out))
            with tempfile.TemporaryDirectory() as out:
                trl_pre.append(run_trl(pairs, args, precompute=True, out_dir=out))
            print(f"repeat {r}: odpo {ours[-1]:.2f}s  trl {trl[-1]:.2f}s  trl+precompute {trl_pre[-1]:.2f}s",
                  file=sys.stderr, flush=True)
    finally:
        group.shutdown()
        ray.shutdown()

    rate = lambda seconds: tokens / min(seconds)  # noqa: E731
    print(json.dumps({
        "bench": "learner", "pairs": len(kept), "batch_size": args.batch_size, "epochs": args.epochs,
        "steps": steps, "tokens": tokens, "threads": args.threads, "repeats": args.repeats,
        "odpo_s": round(min(ours), 3), "trl_s": round(min(trl), 3), "trl_precompute_s": round(min(trl_pre), 3),
        "odpo_tokens_per_s": round(rate(ours), 1), "trl_tokens_per_s": round(rate(trl), 1),
        "trl_precompute_tokens_per_s": round(rate(trl_pre), 1),
        "vs_trl": round(min(trl) / min(ours), 3), "vs_trl_precompute": round(min(trl_pre) / min(ours), 3),
    }))


if __name__ == "__main__":
    main()

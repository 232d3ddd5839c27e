"""Token-budget micro-batches against pair-count ones, on a length-skewed workload.

The workload: pairs whose prompts are 16-64 tokens and whose answers are mostly short (8-48
tokens) with one in six long (200-400 tokens), the spread that sampling at ``max_model_len`` 4096
produces. Pair-count batching (``micro_batch_size`` pairs per forward, right-padded) pads every
short pair of a micro-batch to its longest; the token budget
(``learner.max_tokens_per_micro_batch``) groups the step's pairs by their real lengths and packs
their sequences into rows. The model is a 4-layer Qwen2-shaped model with random weights (hidden
256, vocabulary 8,192), made in a temp folder. Each mode runs in its own process (one learner
rank, 2 threads), so that its peak RSS is its own: the training peak is measured over the RSS
after the model was built. Both take the same steps on the same pairs; their gradients are
captured before every optimizer step and compared.

    .venv/bin/python bench/batching.py [--pairs 96 --batch-size 32 --micro-batch-size 8 --max-tokens 3072]

Prints one JSON line last: ``tokens_per_s_ratio`` and ``peak_rss_ratio`` (token budget over pair
count), each mode's ``tokens_per_s``, ``peak_rss_mb``, ``pad_share``, the largest gradient
difference ``grad_max_diff`` (absolute, next to the largest gradient ``grad_max``) and the
difference's norm over the gradient's (``grad_rel_norm_diff``), and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.harness import machine  # noqa: E402

VOCAB = 8192


def make_model(folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(folder)


def skewed_pairs(n: int, seed: int = 0):
    import random

    from common.types import PreferencePair

    rng = random.Random(seed)
    out = []
    for i in range(n):
        long = rng.random() < 1 / 6
        lengths = [rng.randint(16, 64)] + [rng.randint(200, 400) if long and k == 0 else rng.randint(8, 48)
                                           for k in range(2)]
        rng.shuffle(lengths[1:])
        prompt, chosen, rejected = ([rng.randrange(3, VOCAB) for _ in range(k)] for k in lengths)
        out.append(PreferencePair("", "", "", 1.0, 0.0, prompt_token_ids=prompt, chosen_token_ids=chosen,
                                  rejected_token_ids=rejected))
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_mode(args) -> None:
    """In a child process: one learner, one mode, two rounds (the first a warm-up); writes its figures."""
    import threading

    import torch

    from actors.learner.rank import Learner
    from orchestrator.config import LearnerConfig, ModelConfig

    torch.set_num_threads(2)
    cfg = LearnerConfig(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                        max_tokens_per_micro_batch=args.max_tokens if args.mode == "tokens" else 0,
                        lr=1e-4, beta=0.1, logprob_chunk=256)
    learner = Learner(ModelConfig(path=args.model, tokenizer=str(REPO / "assets/demo/model"), max_model_len=1024), cfg)
    pairs = skewed_pairs(args.pairs)
    learner.train(pairs, round=1)  # warm-up: allocator pools, thread pools
    grads: list[torch.Tensor] = []
    learner.optimizer.register_step_pre_hook(
        lambda opt, a, k: grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters()])))
    base, peak, running = rss_mb(), [0.0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t = time.perf_counter()
    report = learner.train(pairs, round=2)
    seconds = time.perf_counter() - t
    running[0] = False
    watcher.join()
    torch.save(torch.stack(grads), args.out + ".grads.pt")
    Path(args.out).write_text(json.dumps({
        "tokens_per_s": report["tokens"] / seconds, "tokens": report["tokens"], "seconds": seconds,
        "peak_rss_mb": max(peak[0], rss_mb()) - base, "pad_share": report["pad_share"], "steps": report["steps"],
        "loss": report["loss"], "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=3072)
    p.add_argument("--mode", choices=["pairs", "tokens"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return one_mode(args)

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="odpo-batching-"))
    make_model(tmp / "model")
    found = {}
    for mode in ("pairs", "tokens"):
        out = tmp / f"{mode}.json"
        cmd = [sys.executable, __file__, "--mode", mode, "--model", str(tmp / "model"), "--out", str(out),
               "--pairs", str(args.pairs), "--batch-size", str(args.batch_size),
               "--micro-batch-size", str(args.micro_batch_size), "--max-tokens", str(args.max_tokens)]
        subprocess.run(cmd, check=True, cwd=REPO)
        found[mode] = json.loads(out.read_text())
        found[mode]["grads"] = torch.load(str(out) + ".grads.pt")
        print(f"{mode}: {json.dumps({k: v for k, v in found[mode].items() if k != 'grads'})}", file=sys.stderr)
    g_pairs, g_tokens = found["pairs"].pop("grads"), found["tokens"].pop("grads")
    grad_diff = float((g_pairs - g_tokens).abs().max())
    grad_rel = float((g_pairs - g_tokens).norm() / g_pairs.norm())
    result = {
        "bench": "batching",
        "tokens_per_s_ratio": round(found["tokens"]["tokens_per_s"] / found["pairs"]["tokens_per_s"], 3),
        "peak_rss_ratio": round(found["tokens"]["peak_rss_mb"] / found["pairs"]["peak_rss_mb"], 3),
        "pad_share_pairs": round(found["pairs"]["pad_share"], 3),
        "pad_share_tokens": round(found["tokens"]["pad_share"], 3),
        "grad_max_diff": grad_diff, "grad_max": float(g_pairs.abs().max()), "grad_rel_norm_diff": grad_rel,
        "pairs": found["pairs"], "tokens": found["tokens"],
        "settings": {"pairs": args.pairs, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
                     "max_tokens_per_micro_batch": args.max_tokens},
        "machine": machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

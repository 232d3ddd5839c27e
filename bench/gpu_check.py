"""The learner's precision and memory on one CUDA GPU, with torch + transformers only (no Ray, no
vLLM): what a GPU user's first run exercises, checked before that run.

1. Precision: the chunked LM-head log-prob under bf16 autocast against autograd on full logits
   computed the same way, for target probabilities ≈ 0, 0.7, 0.98 and 0.995 (relative gradient
   error, worst row).
2. One learner: an untied Qwen2-shaped model (random weights; ``--shape``), ``learner.precision``
   auto (bf16 where the GPU has it), fp32 master weights, token-budget micro-batches: two rounds
   of DPO steps, tokens/s, peak device memory, and the memory preflight's estimate next to it.
3. fp16: one round with fp16 compute and dynamic loss scaling; the weights must stay finite.

    python bench/gpu_check.py                  # on a machine with one CUDA GPU
    python bench/gpu_check.py --device cpu     # the same checks on CPU (small shape), to know it runs

Prints one JSON line last (``goals_met`` says which checks held).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.harness import machine  # noqa: E402

SHAPES = {
    # Qwen2.5-0.5B's layers with an untied LM head (as the 7B recipes' models have).
    "0.5b-untied": dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14, num_key_value_heads=2, head_dim=64),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}


def precision_errors(device: str) -> dict[str, float]:
    """Worst per-row relative error of the hidden-state gradient, and the weight gradient's, of
    ``linear_logps`` under bf16 autocast against full-logits autograd, per target probability."""
    import torch
    import torch.nn.functional as F

    from actors.learner.loss import linear_logps

    g = torch.Generator().manual_seed(0)
    n, h, v = 64, 128, 8192
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device)
    base = torch.randn(n, h, generator=g).to(device)
    logits = base @ weight.T
    out = {}
    for p_target in (0.0, 0.7, 0.98, 0.995):
        if p_target == 0.0:
            hidden, targets = base.clone(), logits.argmin(-1)
        else:  # move each row along its argmax token's weight until that token has p_target (bisection, all rows at once)
            targets = logits.argmax(-1)
            direction = weight[targets] / weight[targets].norm(dim=-1, keepdim=True)
            lo, hi = torch.full((n, 1), -20.0, device=device), torch.full((n, 1), 40.0, device=device)
            for _ in range(60):
                mid = (lo + hi) / 2
                p = torch.softmax((base + mid * direction) @ weight.T, -1).gather(-1, targets[:, None])
                lo, hi = torch.where(p < p_target, mid, lo), torch.where(p < p_target, hi, mid)
            hidden = base + (lo + hi) / 2 * direction
        grads = []
        for fn in (lambda a, b: linear_logps(a, b, None, targets, 16),
                   lambda a, b: torch.log_softmax(F.linear(a, b).float(), -1).gather(-1, targets[:, None]).squeeze(-1)):
            a, b = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            with torch.autocast(device, dtype=torch.bfloat16):
                fn(a, b).sum().backward()
            grads.append((a.grad.double(), b.grad.double()))
        (gh, gw), (wh, ww) = grads
        row = float(((gh - wh).norm(dim=-1) / wh.norm(dim=-1)).max())
        out[f"p{p_target}"] = {"grad_hidden_worst_row": row, "grad_weight": float((gw - ww).norm() / ww.norm())}
    return out


def make_model(folder: Path, shape: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)).save_pretrained(folder)


def pairs(n: int, vocab: int):
    import random

    from common.types import PreferencePair

    rng = random.Random(0)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    return [PreferencePair("", "", "", 1.0, 0.0, prompt_token_ids=ids(rng.randint(32, 256)),
                           chosen_token_ids=ids(rng.randint(16, 256)), rejected_token_ids=ids(rng.randint(16, 256)))
            for _ in range(n)]


def learner_run(model: Path, device: str, precision: str, args) -> dict:
    import torch

    from actors.learner.rank import Learner
    from actors.learner.precision import all_finite
    from orchestrator.config import LearnerConfig, ModelConfig

    on_gpu = device == "cuda"
    cfg = LearnerConfig(num_gpus_per_worker=1 if on_gpu else 0, precision=precision, batch_size=args.pairs // 2,
                        micro_batch_size=4, max_tokens_per_micro_batch=args.max_tokens, lr=1e-5, beta=0.1)
    model_cfg = ModelConfig(path=str(model), tokenizer=str(REPO / "assets/demo/model"), max_model_len=1024)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    learner = Learner(model_cfg, cfg)
    data = pairs(args.pairs, SHAPES[args.shape]["vocab_size"])
    learner.train(data, round=1)  # warm-up
    if on_gpu:
        torch.cuda.synchronize()
    t = time.perf_counter()
    report = learner.train(data, round=2)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    out = {"compute_dtype": str(learner.compute_dtype).removeprefix("torch."), "steps": report["steps"],
           "overflow_steps": report["overflow_steps"], "loss": report["loss"], "pad_share": report["pad_share"],
           "tokens_per_s": report["tokens"] / seconds, "weights_finite": all_finite(learner.model.parameters()),
           "loss_scale": report["loss_scale"]}
    if on_gpu:
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    # The memory preflight's estimate for this learner, from the model's config.json alone.
    from orchestrator.cli.memory import LearnerSetup, ModelShape, learner_memory, read_model_config
    from orchestrator.config import build_config

    run = build_config({"model": model_cfg.model_dump(), "learner": cfg.model_dump()})
    shape = ModelShape.from_config(read_model_config(str(model))[0])
    out["estimate_gb"] = learner_memory(shape, LearnerSetup.from_config(run)).total / 1e9
    if "peak_gb" in out:
        out["estimate_vs_peak"] = out["estimate_gb"] / out["peak_gb"]
    del learner
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 0.5b-untied on cuda, small on cpu")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=4096)
    args = p.parse_args()
    args.shape = args.shape or ("0.5b-untied" if args.device == "cuda" else "small")
    import tempfile

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu")
    result: dict = {"bench": "gpu_check", "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                    "torch": torch.__version__, "shape": args.shape}
    result["precision"] = precision_errors(args.device)
    model = Path(tempfile.mkdtemp(prefix="odpo-gpu-check-")) / "model"
    make_model(model, args.shape)
    result["bf16_step"] = learner_run(model, args.device, "bf16", args)
    result["fp16_step"] = learner_run(model, args.device, "fp16", args)
    worst = max(v["grad_hidden_worst_row"] for v in result["precision"].values())
    result["goals_met"] = {
        "logprob_grad_error_le_1pct": worst <= 0.01,
        "bf16_step_finite": result["bf16_step"]["weights_finite"] and result["bf16_step"]["steps"] > 0,
        "fp16_step_finite": result["fp16_step"]["weights_finite"] and result["fp16_step"]["steps"] > 0,
    }
    if "estimate_vs_peak" in result["bf16_step"]:
        result["goals_met"]["estimate_within_25pct"] = abs(result["bf16_step"]["estimate_vs_peak"] - 1) <= 0.25
    if args.device == "cpu":
        result["machine"] = machine()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The learner at Qwen2.5-0.5B's size: memory per rank, start-up, log-probs, checkpoints, speed.

Rehearsed on the rehearsal model (``odpo make-rehearsal-model``: Qwen2.5-0.5B's architecture and
shape, random weights) with CPU workers joined by gloo, each a fresh process started here (what
a ``LearnerWorker`` does, without Ray). Batch: 8 pairs of 192 prompt + 64 completion token ids
(random ids, fixed seed), micro-batches of 4 pairs, activation checkpointing on, fp32 policy,
fp32 reference (``ref_dtype: auto`` on CPU), AdamW. Runs:

- ``1w``: one worker (DDP strategy; alone it is plain data parallelism of one), 2 threads.
- ``2w``: two FSDP2 workers, 1 thread each; then a sharded checkpoint save and load.
- ``load``: two FSDP2 workers building the policy only (meta init, shards, rank 0 streams the
  safetensors): the peak of rank 1, which must never hold the whole model.
- ``logprob``: the log-prob stage alone (LM head over the batch's hidden states, forward and
  backward) by the completion-only chunked path and by the previous full-logits path, each in
  a fresh process.

Each memory figure is measured in the process it describes: the increase of its peak RSS
(``getrusage`` high-water mark, or a 2 ms sampling thread for phases after the first) over its
RSS after imports, before any model is built. The two train setups' peaks are set against the
memory preflight's estimate for them (``orchestrator.cli.memory``, from the model's config.json):
``estimate_vs_peak_1w`` and ``estimate_vs_peak_fsdp2`` (goal: within 0.75-1.25). Each train call is one optimizer step (one
round); its tokens per second cover the reference forward and the step, for the whole group.

    flock /tmp/odpo-bigmem.lock .venv/bin/python bench/scale.py [--model DIR] [--keep DIR] [--phases ...]

Prints one JSON line last (figures in bytes, seconds and tokens per second).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # also in the spawned workers, which import this file
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.harness import machine  # noqa: E402

PAIRS, PROMPT, COMPLETION, MICRO = 8, 192, 64, 4


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Sampler:
    """Highest RSS seen between ``start`` and ``stop`` (sampled every 2 ms)."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def make_pairs(vocab: int, seed: int = 0):
    import torch

    from common.types import PreferencePair

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(PAIRS):
        prompt, chosen, rejected = (torch.randint(0, vocab, (n,), generator=g).tolist()
                                    for n in (PROMPT, COMPLETION, COMPLETION))
        out.append(PreferencePair("", "", "", 1.0, 0.0, prompt_token_ids=prompt, chosen_token_ids=chosen,
                                  rejected_token_ids=rejected, chosen_finish_reason="length",
                                  rejected_finish_reason="length"))
    return out


def configs(model: str, world: int, strategy: str):
    from orchestrator.config import LearnerConfig, ModelConfig

    return (ModelConfig(path=model, max_model_len=PROMPT + COMPLETION),
            LearnerConfig(num_workers=world, strategy=strategy, batch_size=PAIRS, micro_batch_size=MICRO,
                          activation_checkpointing=True, lr=1e-5, timeout_s=7200))


def estimate(model: str, world: int, strategy: str) -> int:
    """The memory preflight's peak for one rank of this setup (bytes), from config.json alone."""
    from orchestrator.cli.memory import LearnerSetup, ModelShape, learner_memory, read_model_config
    from orchestrator.config import RunConfig

    model_cfg, learner_cfg = configs(model, world, strategy)
    setup = LearnerSetup.from_config(RunConfig(model=model_cfg, learner=learner_cfg))
    return round(learner_memory(ModelShape.from_config(read_model_config(model)[0]), setup).total)


def _setup(rank: int, world: int, port: int, threads: int):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    # Everything imported before the baseline counts as the interpreter's, not the figures'.
    import psutil  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401

    import actors.learner.rank  # noqa: F401


def _tokenizer_vocab(model: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model))


def worker(rank: int, world: int, port: int, phase: str, model: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    _setup(rank, world, port, threads=2 if world == 1 else 1)
    res: dict = {"rank": rank}
    base = res["baseline_rss"] = rss()
    if phase == "load":
        from actors.learner import sharding
        from actors.learner.modeling import build_empty, materialize, weights_source
        from actors.learner.weights.stream import load_streamed

        t = time.perf_counter()
        policy = build_empty(model, torch.float32)
        sharding.fsdp_shard(policy)
        materialize(policy, "cpu")
        load_streamed(policy, weights_source(model, set(policy.state_dict())) if rank == 0 else None)
        dist.barrier()
        res["load_s"] = time.perf_counter() - t
        res["load_peak"] = max_rss() - base
    elif phase == "train":
        from actors.learner.rank import Learner

        model_cfg, cfg = configs(model, world, "fsdp" if world > 1 else "ddp")
        t = time.perf_counter()
        learner = Learner(model_cfg, cfg)
        res["init_s"], res["init_peak"] = time.perf_counter() - t, max_rss() - base
        res["params"] = sum(p.numel() for p in learner.model.parameters())
        pairs = make_pairs(_tokenizer_vocab(model))
        res["reports"] = [learner.train(pairs, round=r) for r in (1, 2)]
        res["train_peak"] = max_rss() - base
        if world == 1:
            res["logprob_max_abs_diff"] = _compare_logps(learner, pairs[:2])
        else:
            ckpt = Path(out_dir) / "ckpt"
            before = rss()
            with Sampler() as s:
                t = time.perf_counter()
                learner.save(str(ckpt))
                res["ckpt_save_s"] = time.perf_counter() - t
                t = time.perf_counter()
                learner.load(str(ckpt))
                res["ckpt_load_s"] = time.perf_counter() - t
            res["ckpt_peak"], res["ckpt_extra"] = s.peak - base, s.peak - before
            res["ckpt_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) if rank == 0 else 0
    elif phase in ("logprob_chunked", "logprob_naive"):
        res.update(_logprob_stage(model, naive=phase == "logprob_naive", base=base))
    torch.save(res, Path(out_dir) / f"{phase}-{world}-{rank}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _compare_logps(learner, pairs) -> dict:
    """The completion-only chunked log-probs against the full-logits ones (previous code), on
    the model: per token, and per sequence as the learner sums them."""
    import torch

    from actors.learner.batching import collate
    from actors.learner.loss import completion_targets, linear_logps, token_logps

    kept, _ = learner._tokenize(pairs)
    model = learner.model
    with torch.no_grad():
        new, _ = learner._logps(model, kept, learner.device)
        batch = collate(kept, learner.pad_id)
        ids, mask = batch["input_ids"], batch["completion_mask"]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        old_tokens = token_logps(logits, ids, mask)
        del logits
        select, targets, _ = completion_targets(ids, mask)
        hidden = model.model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        tokens = linear_logps(hidden[:, :-1][select], model.lm_head.weight, None, targets)
    old = old_tokens.sum(-1)
    return {"token": float((tokens - old_tokens[select]).abs().max()),
            "sum": float((new.T.reshape(-1) - old).abs().max()), "sum_magnitude": float(old.abs().max())}


def _logprob_stage(model: str, *, naive: bool, base: int) -> dict:
    """Peak of the log-prob stage over its inputs: hidden states of the whole micro-batch
    ``[2*MICRO, PROMPT+COMPLETION, H]`` and the LM head, forward and backward."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig

    from actors.learner.loss import completion_targets, linear_logps, token_logps

    config = AutoConfig.from_pretrained(model)
    g = torch.Generator().manual_seed(0)
    rows, length = 2 * MICRO, PROMPT + COMPLETION
    # Made in place: no temporary may raise the high-water mark before the stage starts.
    hidden = torch.empty(rows, length, config.hidden_size).normal_(generator=g).requires_grad_()
    weight = torch.empty(config.vocab_size, config.hidden_size).normal_(0, 0.02, generator=g).requires_grad_()
    ids = torch.randint(0, config.vocab_size, (rows, length), generator=g)
    mask = torch.zeros(rows, length, dtype=torch.long)
    mask[:, PROMPT:] = 1
    start = rss()
    t = time.perf_counter()
    if naive:
        out = token_logps(F.linear(hidden, weight), ids, mask).sum(-1)
    else:
        select, targets, row = completion_targets(ids, mask)
        token = linear_logps(hidden[:, :-1][select], weight, None, targets)
        out = torch.zeros(rows).index_add(0, row, token)
    out.sum().backward()
    return {"peak": max_rss() - start, "seconds": time.perf_counter() - t, "sums": out.detach(),
            "inputs_bytes": start - base}


def launch(phase: str, world: int, model: str, out_dir: str, fresh: bool = True) -> list[dict]:
    import torch
    import torch.multiprocessing as mp

    if not fresh:
        return [torch.load(Path(out_dir) / f"{phase}-{world}-{r}.pt", weights_only=False) for r in range(world)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    mp.spawn(worker, args=(world, port, phase, model, out_dir), nprocs=world)
    print(f"{phase} x{world}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return [torch.load(Path(out_dir) / f"{phase}-{world}-{r}.pt", weights_only=False) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="rehearsal model folder (default: made in a temp folder, then removed)")
    parser.add_argument("--phases", default="logprob,load,train1,train2",
                        help="comma-separated phases to run (default: all); the others' results are read "
                             "from --keep (a folder a previous run of the same code left)")
    parser.add_argument("--keep", help="keep each phase's results in this folder (default: a temp folder, removed)")
    args = parser.parse_args()
    out_dir = args.keep or tempfile.mkdtemp(prefix="odpo-scale-")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    phases = set(args.phases.split(","))
    model = args.model
    try:
        if model is None:
            from orchestrator.tools.rehearsal import make_rehearsal_model

            model = str(Path(out_dir) / "model")
            make_rehearsal_model(model)
        run = lambda name, phase, world: launch(phase, world, model, out_dir, name in phases)  # noqa: E731
        logprob = {kind: run("logprob", f"logprob_{kind}", 1)[0] for kind in ("naive", "chunked")}
        load = run("load", "load", 2)
        one = run("train1", "train", 1)[0]
        two = run("train2", "train", 2)
        figures = summarize(logprob, load, one, two, {"1w": estimate(model, 1, "ddp"), "2w": estimate(model, 2, "fsdp")})
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    print(json.dumps(figures))


def summarize(logprob: dict, load: list[dict], one: dict, two: list[dict], estimates: dict) -> dict:
    params = one["params"]
    model_bytes = 4 * params
    peak_1w = one["train_peak"]
    peak_2w = max(r["train_peak"] for r in two)
    tokens = one["reports"][0]["tokens"]
    steps_1w = [r["tokens_per_s"] for r in one["reports"]]
    steps_2w = [r["tokens_per_s"] for r in two[0]["reports"]]
    loss_1w, loss_2w = one["reports"][1]["loss"], two[0]["reports"][1]["loss"]
    naive, chunked = logprob["naive"], logprob["chunked"]
    return {
        "bench": "scale", "date": date.today().isoformat(), "model": "rehearsal Qwen2.5-0.5B shape (random weights)",
        "params": params, "model_fp32_bytes": model_bytes, "tokens_per_step": tokens,
        "peak_rss_per_rank_1w": peak_1w, "peak_rss_per_rank_2w_fsdp": peak_2w,
        "fsdp2_vs_single": round(peak_2w / peak_1w, 4),
        "estimate_1w": estimates["1w"], "estimate_fsdp2": estimates["2w"],
        "estimate_vs_peak_1w": round(estimates["1w"] / peak_1w, 4),
        "estimate_vs_peak_fsdp2": round(estimates["2w"] / peak_2w, 4),
        "init_peak_rss_1w": one["init_peak"], "init_peak_rss_per_rank_2w_fsdp": max(r["init_peak"] for r in two),
        "load_peak_rss_rank0": load[0]["load_peak"], "load_peak_rss_nonzero_rank": load[1]["load_peak"],
        "load_nonzero_rank_vs_model": round(load[1]["load_peak"] / model_bytes, 4), "load_s": load[0]["load_s"],
        "logprob_peak_bytes": chunked["peak"], "logprob_naive_peak_bytes": naive["peak"],
        "logprob_peak_vs_naive": round(chunked["peak"] / naive["peak"], 4),
        "logprob_stage_s": chunked["seconds"], "logprob_naive_stage_s": naive["seconds"],
        "logprob_stage_max_abs_diff": float((chunked["sums"] - naive["sums"]).abs().max()),
        "logprob_token_max_abs_diff": one["logprob_max_abs_diff"]["token"],
        "logprob_sum_max_abs_diff": one["logprob_max_abs_diff"]["sum"],
        "logprob_sum_magnitude": one["logprob_max_abs_diff"]["sum_magnitude"],
        "ckpt_save_s": two[0]["ckpt_save_s"], "ckpt_load_s": two[0]["ckpt_load_s"],
        "ckpt_peak_rss_per_rank": max(r["ckpt_peak"] for r in two),
        "ckpt_extra_rss_per_rank": max(r["ckpt_extra"] for r in two), "ckpt_bytes": two[0]["ckpt_bytes"],
        "tokens_per_s_1w": round(max(steps_1w), 2), "tokens_per_s_2w": round(max(steps_2w), 2),
        "loss_step1": [one["reports"][0]["loss"], two[0]["reports"][0]["loss"]],
        "loss_step2_1w": loss_1w, "loss_step2_2w": loss_2w, "loss_abs_diff": abs(loss_1w - loss_2w),
        "logp_chosen_step2_abs_diff": abs(one["reports"][1]["logp_chosen"] - two[0]["reports"][1]["logp_chosen"]),
        "goals_met": {
            "fsdp2_vs_single<=0.60": peak_2w / peak_1w <= 0.60,
            "load_nonzero_rank_vs_model<=0.6": load[1]["load_peak"] / model_bytes <= 0.6,
            "logprob_peak_vs_naive<=0.25": chunked["peak"] / naive["peak"] <= 0.25,
            "loss_2w_equals_1w_1e-4": abs(loss_1w - loss_2w) <= 1e-4,
            "estimate_within_25pct": all(0.75 <= e / p <= 1.25 for e, p in ((estimates["1w"], peak_1w),
                                                                         (estimates["2w"], peak_2w))),
        },
        "machine": machine(),
    }


if __name__ == "__main__":
    main()

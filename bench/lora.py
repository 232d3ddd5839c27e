"""LoRA against full fine-tuning at Qwen2.5-0.5B's size, side by side in one run: the learner's
peak memory per rank, the weight sync's bytes and seconds, the checkpoint's bytes.

On the rehearsal model (``odpo make-rehearsal-model``: Qwen2.5-0.5B's architecture and shape,
random weights), the same two learners: full fine-tuning (fp32 weights, fp32 reference, AdamW
over every weight) and ``learner.lora`` with r 16, alpha 32 on every linear layer (the fp32 base
frozen, the reference the adapter switched off, AdamW over the adapter).

- ``learner``: each learner in a fresh process (one rank, 2 threads), the batch of
  ``bench/scale.py`` (8 pairs of 192 prompt + 64 completion token ids, micro-batches of 4 pairs,
  activation checkpointing), two rounds of one optimizer step each, then a checkpoint. Peak RSS
  over the process's RSS after imports; the checkpoint folder's bytes.
- ``sync``: each learner as the loop runs it (a ``LearnerGroup`` of one Ray worker) syncing into a
  bf16 vLLM generator on this machine (``sync_weights``, the default backend: /dev/shm):
  full weights into a plain engine, the adapter into an engine started with ``enable_lora``.
  The median of the warm syncs (the first is reported apart) and the bytes each moves.
- ``learning`` (not run by default): the demo task, 40 rounds each, held-out accuracy (mean of the
  last 3 evals) of full fine-tuning (``configs/demo.yaml``) and LoRA (``configs/demo-lora.yaml``),
  each over an lr grid on seed 0, then its best lr on the other seeds.

    flock /tmp/odpo-bigmem.lock .venv/bin/python bench/lora.py [--model DIR] [--syncs 5] [--phases learner,sync]
    .venv/bin/python bench/lora.py --phases learning [--lrs-full 3e-5,1e-4,3e-4] [--lrs-lora 5e-4,1e-3,2e-3,5e-3]
        [--seeds 0,1] [--out DIR]

Prints one JSON line last, with the machine (``bench.harness.machine()``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # also in the spawned workers, which import this file
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from bench.harness import evals, last3, machine, run_config  # noqa: E402
from bench.scale import MICRO, PAIRS, PROMPT, COMPLETION, _setup, _tokenizer_vocab, make_pairs, max_rss, rss  # noqa: E402

LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
MODEL = "/work/models/rehearsal-0.5b"


def learner_cfgs(model: str, lora: bool):
    from orchestrator.config import LearnerConfig, LoraConfig, ModelConfig

    return (ModelConfig(path=model, max_model_len=PROMPT + COMPLETION),
            LearnerConfig(num_workers=1, strategy="ddp", batch_size=PAIRS, micro_batch_size=MICRO, lr=1e-5,
                          activation_checkpointing=True, timeout_s=7200,
                          lora=LoraConfig(**LORA) if lora else None))


def learner_worker(rank: int, variant: str, model: str, out_dir: str, port: int) -> None:
    """A fresh process: build, two rounds, a checkpoint; figures to ``out_dir/learner-<variant>.json``."""
    _setup(0, 1, port, threads=2)
    from actors.learner.rank import Learner

    res: dict = {"variant": variant}
    base = res["baseline_rss"] = rss()
    t = time.perf_counter()
    learner = Learner(*learner_cfgs(model, variant == "lora"))
    res["init_s"], res["init_peak"] = time.perf_counter() - t, max_rss() - base
    res["trained_params"] = sum(p.numel() for p in learner.schedule.params)
    pairs = make_pairs(_tokenizer_vocab(model))
    reports = [learner.train(pairs, round=r) for r in (1, 2)]
    res["train_peak"] = max_rss() - base
    res["tokens_per_s"] = max(r["tokens_per_s"] for r in reports)
    res["loss"] = [r["loss"] for r in reports]
    ckpt = Path(out_dir) / f"ckpt-{variant}"
    t = time.perf_counter()
    learner.save(str(ckpt))
    res["ckpt_save_s"] = time.perf_counter() - t
    res["ckpt_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    shutil.rmtree(ckpt, ignore_errors=True)
    (Path(out_dir) / f"learner-{variant}.json").write_text(json.dumps(res))


def run_learner(variant: str, model: str, out_dir: str) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    mp.spawn(learner_worker, args=(variant, model, out_dir, port), nprocs=1)
    print(f"learner {variant}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return json.loads((Path(out_dir) / f"learner-{variant}.json").read_text())


def run_sync(variant: str, model: str, syncs: int) -> dict:
    """``syncs`` weight syncs of one learner into one bf16 generator (both started here)."""

    from actors.generator.pool import GeneratorPool
    from actors.learner.group import LearnerGroup
    from actors.weight_sync import sync_weights
    from orchestrator.config import GeneratorConfig, ModelConfig, SyncConfig

    model_cfg, cfg = learner_cfgs(model, variant == "lora")
    gen_cfg = GeneratorConfig(num_actors=1, n=2, max_new_tokens=4, dtype="bfloat16",
                              engine={"enforce_eager": True, "kv_cache_memory_bytes": 128 << 20})
    pool = GeneratorPool(ModelConfig(path=model, max_model_len=PROMPT + COMPLETION), gen_cfg,
                         lora_rank=cfg.lora.r if cfg.lora else None)
    group = None
    try:
        group = LearnerGroup(model_cfg, cfg)
        runs = [sync_weights(group, pool, pool.version + 1, SyncConfig()) for _ in range(syncs)]
        assert pool.versions() == [pool.version] and {r["path"] for r in runs} == {"shm"}, runs
        warm = runs[1:]
        out = {"first_s": runs[0]["total_s"], "warm_s": statistics.median(r["total_s"] for r in warm),
               "publish_s": statistics.median(r["publish_s"] for r in warm),
               "load_s": statistics.median(r["load_s"] for r in warm), "bytes": runs[0]["bytes"]}
        groups = pool.sample([{"prompt": "Hello"}], seed=0)  # the engine still samples after the syncs
        out["sampled_version"] = groups[0].policy_version
    finally:
        if group is not None:
            group.shutdown()
        pool.shutdown()
    print(f"sync {variant}: {out}", file=sys.stderr, flush=True)
    return out


def run_learning(lrs: dict[str, list[float]], seeds: list[int], out_dir: str | None) -> dict:
    """Each variant's lr grid on the first seed, then its best lr (highest mean of the last 3
    evals) on the other seeds; gains over round 0."""
    configs = {"full": "configs/demo.yaml", "lora": "configs/demo-lora.yaml"}
    out: dict = {}
    for variant, grid in lrs.items():
        def run(lr: float, seed: int) -> dict:
            lines, wall = run_config(f"learning-{variant}-lr{lr:g}-s{seed}", [f"learner.lr={lr}", f"run.seed={seed}"],
                                     config=configs[variant], out_dir=out_dir, reuse=out_dir is not None)
            points = evals(lines)
            return {"start": round(points[0][1], 3), "last3": round(last3(lines), 3), "wall_s": round(wall),
                    "evals": [[r, round(v, 3)] for r, v in points]}

        cells = {f"{lr:g}": run(lr, seeds[0]) for lr in grid}
        best = max(cells, key=lambda k: cells[k]["last3"])
        by_seed = {seeds[0]: cells[best], **{s: run(float(best), s) for s in seeds[1:]}}
        gains = [c["last3"] - c["start"] for c in by_seed.values()]
        out[variant] = {"grid": {k: c["last3"] for k, c in cells.items()}, "best_lr": float(best),
                        "by_seed": by_seed, "gain_mean": round(sum(gains) / len(gains), 3),
                        "gain_min": round(min(gains), 3)}
        print(f"learning {variant}: grid {out[variant]['grid']}, best lr {best}, gain mean {out[variant]['gain_mean']}",
              file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL if Path(MODEL).is_dir() else None,
                        help=f"rehearsal model folder (default: {MODEL} when present, else made in a temp folder)")
    parser.add_argument("--syncs", type=int, default=5, help="syncs per learner (the first is reported apart)")
    parser.add_argument("--phases", default="learner,sync",
                        help="comma-separated: learner, sync, learning (default: learner,sync)")
    parser.add_argument("--lrs-full", default="3e-5,1e-4,3e-4", help="learning: full fine-tuning's lr grid")
    parser.add_argument("--lrs-lora", default="5e-4,1e-3,2e-3,5e-3", help="learning: LoRA's lr grid")
    parser.add_argument("--seeds", default="0,1", help="learning: the grid runs on the first, the best lr on all")
    parser.add_argument("--out", help="learning: keep the runs here and reuse finished ones")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    out_dir = tempfile.mkdtemp(prefix="odpo-bench-lora-", dir=str(REPO / "runs") if (REPO / "runs").is_dir() else None)
    model = args.model
    line: dict = {"bench": "lora", "date": date.today().isoformat(), "model": "rehearsal Qwen2.5-0.5B shape",
                  "lora": LORA, "machine": machine()}
    try:
        if model is None:
            from orchestrator.tools.rehearsal import make_rehearsal_model

            model = str(Path(out_dir) / "model")
            make_rehearsal_model(model)
        if "learner" in phases:
            full, lora = run_learner("full", model, out_dir), run_learner("lora", model, out_dir)
            line.update({
                "learner_peak_full": full["train_peak"], "learner_peak_lora": lora["train_peak"],
                "learner_peak_lora_vs_full": round(lora["train_peak"] / full["train_peak"], 4),
                "trained_params_full": full["trained_params"], "trained_params_lora": lora["trained_params"],
                "tokens_per_s_full": round(full["tokens_per_s"], 2), "tokens_per_s_lora": round(lora["tokens_per_s"], 2),
                "ckpt_bytes_full": full["ckpt_bytes"], "ckpt_bytes_lora": lora["ckpt_bytes"],
                "ckpt_bytes_lora_vs_full": round(lora["ckpt_bytes"] / full["ckpt_bytes"], 5),
                "ckpt_save_s_full": round(full["ckpt_save_s"], 2), "ckpt_save_s_lora": round(lora["ckpt_save_s"], 2),
            })
        if "learning" in phases:
            learning = run_learning({"full": [float(x) for x in args.lrs_full.split(",")],
                                     "lora": [float(x) for x in args.lrs_lora.split(",")]},
                                    [int(x) for x in args.seeds.split(",")], args.out)
            line.update({"learning": learning, "lora_gain_40_rounds": learning["lora"]["gain_mean"],
                         "full_gain_40_rounds": learning["full"]["gain_mean"]})
        if "sync" in phases:
            import ray

            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
            try:
                full, lora = run_sync("full", model, args.syncs), run_sync("lora", model, args.syncs)
            finally:
                ray.shutdown()
            line.update({
                "sync_bytes_full": full["bytes"], "sync_bytes_lora": lora["bytes"],
                "sync_bytes_lora_vs_full": round(lora["bytes"] / full["bytes"], 5),
                "sync_s_full": round(full["warm_s"], 4), "sync_s_lora": round(lora["warm_s"], 4),
                "sync_first_s_full": round(full["first_s"], 4), "sync_first_s_lora": round(lora["first_s"], 4),
                "sync_load_s_full": round(full["load_s"], 4), "sync_load_s_lora": round(lora["load_s"], 4),
                "sync_s_lora_vs_full": round(lora["warm_s"] / full["warm_s"], 4),
            })
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    goals = {"learner_peak_lora_vs_full": 0.45, "sync_bytes_lora_vs_full": 0.02, "sync_s_lora_vs_full": 0.15,
             "ckpt_bytes_lora_vs_full": 0.05}
    if "lora_gain_40_rounds" in line:
        line.setdefault("goals_met", {})["lora_gain_40_rounds>=0.25"] = line["lora_gain_40_rounds"] >= 0.25
    line["goals_met"] = {**{f"{k}<={v}": line[k] <= v for k, v in goals.items() if k in line},
                         **line.get("goals_met", {})}
    print(json.dumps(line))


if __name__ == "__main__":
    main()

"""Generation speed of a ``GeneratorActor`` (through ``GeneratorPool``, Ray) against a plain vLLM
engine in one process, on the same prompts and settings, in one run.

Both sides use the config's model and generator sections (default: the CPU demo) with the same
engine arguments and the same per-prompt seeds, so they sample the same tokens. The plain engine
runs first in a subprocess (text prompts straight into ``LLM.generate``), then the pool with one
actor that reserves every core (Ray sets the actor's thread count from its CPUs), one after the
other so they do not compete, ``--repeats`` times alternating. Each run has one untimed warm-up
round, then ``--rounds`` timed rounds of ``--prompts`` prompts (the same seeds on both sides, so
the same tokens: ``same_tokens``); a side's figure is its best round (the machine is shared).
Tokens are every sampled token, EOS included.

    .venv/bin/python bench/generation.py [--prompts 256 --rounds 3 --config configs/demo.yaml --set k=v]

Prints one JSON line last: ``standalone_tokens_per_s``, ``actor_tokens_per_s`` and
``in_actor_vs_standalone`` (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_rows(cfg, count: int) -> list[dict]:
    source = Path(cfg.data.eval_source or cfg.data.source)
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    return (rows * (count // len(rows) + 1))[:count]


def standalone(cfg, rows: list[dict], rounds: int) -> dict:
    """A plain vLLM engine in this process."""
    import torch
    from vllm import LLM, SamplingParams

    from actors.generator.sampling import engine_kwargs, prompt_seed

    gen = cfg.generator
    llm = LLM(**engine_kwargs(cfg.model, gen, cfg.run.seed, on_gpu=torch.cuda.is_available()))
    prompts = [r[cfg.data.prompt_field] for r in rows]

    def params(seed):
        return [SamplingParams(n=gen.n, temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_new_tokens,
                               stop=list(gen.stop) or None, seed=prompt_seed(seed, i, gen.n), logprobs=0)
                for i in range(len(prompts))]

    llm.generate(prompts, params(-1), use_tqdm=False)
    runs = []
    for r in range(rounds):
        p = params(r)
        start = time.perf_counter()
        outs = llm.generate(prompts, p, use_tqdm=False)
        runs.append((sum(len(c.token_ids) for o in outs for c in o.outputs), time.perf_counter() - start))
    return {"runs": runs, "torch_threads": torch.get_num_threads()}


def in_actor(cfg, rows: list[dict], rounds: int, cpus: int) -> dict:
    """The same through ``GeneratorPool`` with one actor."""
    import ray

    from actors.generator.pool import GeneratorPool

    gen = cfg.generator.model_copy(update={"num_actors": 1, "num_cpus": cpus})
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    pool = GeneratorPool(cfg.model, gen, prompt_field=cfg.data.prompt_field, seed=cfg.run.seed)
    try:
        pool.sample(rows, seed=-1)
        runs = []
        for r in range(rounds):
            start = time.perf_counter()
            pool.sample(rows, seed=r)
            runs.append((int(pool.last_sample_stats["tokens"]), time.perf_counter() - start))
        threads = ray.get(pool.actors[0].apply.remote(lambda actor: __import__("torch").get_num_threads()), timeout=60)
    finally:
        pool.shutdown()
        ray.shutdown()
    return {"runs": runs, "torch_threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="times each side runs, alternating")
    parser.add_argument("--actor-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--standalone", action="store_true", help=argparse.SUPPRESS)  # the subprocess side
    args = parser.parse_args()

    from orchestrator.config import load_config

    cfg = load_config(args.config, args.set)
    rows = load_rows(cfg, args.prompts)
    if args.standalone:
        print(json.dumps(standalone(cfg, rows, args.rounds)))
        return

    cmd = [sys.executable, __file__, "--standalone", "--config", args.config, "--prompts", str(args.prompts),
           "--rounds", str(args.rounds)] + [x for s in args.set for x in ("--set", s)]
    plain_runs, actor_runs, threads = [], [], {}
    for _ in range(args.repeats):  # alternate the sides: the machine is shared and its load drifts
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"standalone side exited {proc.returncode}")
        plain = json.loads(proc.stdout.strip().splitlines()[-1])
        actor = in_actor(cfg, rows, args.rounds, args.actor_cpus)
        plain_runs += plain["runs"]
        actor_runs += actor["runs"]
        threads = {"standalone_threads": plain["torch_threads"], "actor_threads": actor["torch_threads"]}
        print(f"standalone rounds {plain['runs']}\nactor rounds {actor['runs']}", file=sys.stderr, flush=True)
    plain_tps = max(t / s for t, s in plain_runs)
    actor_tps = max(t / s for t, s in actor_runs)
    print(json.dumps({
        "bench": "generation", "prompts": args.prompts, "rounds": args.rounds, "repeats": args.repeats,
        "n": cfg.generator.n, "max_new_tokens": cfg.generator.max_new_tokens, "engine": cfg.generator.engine,
        "same_tokens": [t for t, _ in plain_runs] == [t for t, _ in actor_runs], **threads,
        "standalone_tokens_per_s": round(plain_tps, 1), "actor_tokens_per_s": round(actor_tps, 1),
        "in_actor_vs_standalone": round(actor_tps / plain_tps, 3),
    }))


if __name__ == "__main__":
    main()

"""Weight sync speed against the engine's own floor, on the demo model, a ~113M-parameter Llama of
the same architecture (random weights, built here) and the rehearsal model (Qwen2.5-0.5B's shape,
``odpo make-rehearsal-model``) served in bfloat16 from a float32 learner.

For each model: seconds per ``sync_weights`` with every backend that runs on one machine
(``object_store`` through the same-node /dev/shm fast path, which is the default backend's choice
here; ``object_store`` through Ray's object store proper; ``disk``), the first sync and the median
of the warm ones; the seconds of a bare in-process ``reload_weights`` of the same tensors (the
engine's dtype) into the same engine (the floor; median of runs before and after the syncs); and
of one in-memory copy of the same bytes. ``sync_vs_reload_100m`` divides the best backend's warm
sync by the floor; ``sync_vs_reload_0p5b_bf16`` the default backend's (cast to bf16 on the
learner included). For tied-embedding models the engine's reload skips the LM head, so a correct
reload also re-packs it (every sync does): ``reload_tied_s_*`` and ``sync_vs_reload_tied_0p5b_bf16``
measure against that. The last line is one JSON object.

    flock /tmp/odpo-bigmem.lock .venv/bin/python bench/sync.py [--syncs 5] [--rehearsal-model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch  # noqa: E402

from actors.generator.pool import GeneratorPool  # noqa: E402
from actors import weight_sync  # noqa: E402
from actors.weight_sync import reload_tensors, sync_weights  # noqa: E402
from orchestrator.config import GeneratorConfig, ModelConfig, SyncConfig  # noqa: E402

DEMO = REPO / "assets" / "demo" / "model"


def build_100m(out: Path) -> Path:
    """The demo's architecture at hidden 768, 12 layers of 12 heads x 64, vocab 128: ~113M params."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, head_dim=64, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(DEMO).save_pretrained(out)
    return out


@ray.remote(num_cpus=0)
class BenchLearner:
    """Stand-in for the learner's rank-0 worker, HF weights in memory: ``LearnerWorker``'s
    weight-sync methods (actors/weight_sync/base.py), on a worker that is its own learner rank."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.rank = 0

    def apply(self, fn, *args, **kwargs):
        return fn(self, *args, **kwargs)

    def iter_full_state(self, dtype=None):
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.detach()

    def publish_weights(self, request):
        return weight_sync.publish_rank(self, request)

    def prepare_weight_stream(self, spec, path):
        return weight_sync.prepare_stream(self, spec, path)

    def node_info(self, shm_dir):
        return weight_sync.node_info(shm_dir)

    def remove_sync_files(self, paths):
        weight_sync.remove_files(paths)


class Group:
    def __init__(self, path: str):
        self.workers = [BenchLearner.remote(path)]
        self.rank0 = self.workers[0]
        self.cfg = argparse.Namespace(strategy="ddp")


def _bare_reload(actor, path: str, repeats: int) -> list[tuple[float, float]]:
    # Runs in the generator actor: the checkpoint's tensors copied into memory, then reloaded.
    from safetensors.torch import load_file

    named = [(k, v.clone()) for k, v in load_file(path).items()]
    return [reload_tensors(actor.llm, named) for _ in range(repeats)]


def memcpy_s(nbytes: int, repeats: int = 5) -> float:
    src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(1)
    dst.fill_(0)  # both sides faulted in, as the reused sync buffers are
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return min(times)


def bench_model(name: str, path: Path, syncs: int, tmp: Path, dtype: str | None = None) -> dict:
    model_cfg = ModelConfig(path=str(path), max_model_len=64)
    gen_cfg = GeneratorConfig(num_actors=1, n=2, max_new_tokens=4, engine={"enforce_eager": True}, dtype=dtype)
    pool = GeneratorPool(model_cfg, gen_cfg)
    learner = Group(str(path))
    ray.get(learner.rank0.apply.remote(lambda worker: None), timeout=600)  # model loaded before timing
    out: dict = {"params": sum(torch.Size(s).numel() for s in pool.param_spec.shapes.values())}
    files = sorted(path.glob("*.safetensors"))
    try:
        # The floor is measured before and after the syncs (the machine is shared; it drifts).
        reloads = ray.get(pool.actors[0].apply.remote(_bare_reload, str(files[0]), syncs), timeout=600)
        transports = {"shm": SyncConfig(), "object_store": SyncConfig(shm_dir=None),
                      "disk": SyncConfig(backend="disk", disk_path=str(tmp / f"{name}-sync"))}
        for label, cfg in transports.items():
            runs = [sync_weights(learner, pool, pool.version + 1, cfg) for _ in range(syncs)]
            assert pool.versions() == [pool.version]
            warm = runs[1:]
            out[label] = {"first_s": runs[0]["total_s"],
                          "warm_s": statistics.median(r["total_s"] for r in warm),
                          "publish_s": statistics.median(r["publish_s"] for r in warm),
                          "load_s": statistics.median(r["load_s"] for r in warm)}
            out["bytes"] = runs[0]["bytes"]
            print(f"{name} {label}: {out[label]}", file=sys.stderr, flush=True)
        reloads += ray.get(pool.actors[0].apply.remote(_bare_reload, str(files[0]), syncs), timeout=600)
        out["bare_reload_s"] = statistics.median(r[0] for r in reloads)
        out["reload_tied_s"] = statistics.median(r[1] for r in reloads)
        out["memcpy_s"] = memcpy_s(int(out["bytes"]))
        print(f"{name} bare reload {out['bare_reload_s']:.4f}s (+ tied refresh {out['reload_tied_s']:.4f}s) "
              f"memcpy {out['memcpy_s']:.4f}s", file=sys.stderr)
    finally:
        pool.shutdown()
        for w in learner.workers:
            ray.kill(w)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syncs", type=int, default=5, help="syncs per backend (the first is reported apart)")
    parser.add_argument("--rehearsal-model", help="rehearsal model folder (default: made in a temp folder, then removed)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="odpo-bench-sync-"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        rehearsal = Path(args.rehearsal_model) if args.rehearsal_model else tmp / "rehearsal-0.5b"
        if not (rehearsal / "config.json").exists():
            from orchestrator.tools.rehearsal import make_rehearsal_model

            make_rehearsal_model(str(rehearsal))
        results = {"demo": bench_model("demo", DEMO, args.syncs, tmp),
                   "100m": bench_model("100m", build_100m(tmp / "model-100m"), args.syncs, tmp),
                   "0p5b_bf16": bench_model("0p5b_bf16", rehearsal, args.syncs, tmp, dtype="bfloat16")}
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    line: dict = {"bench": "sync", "date": date.today().isoformat(), "syncs_per_backend": args.syncs}
    for name, r in results.items():
        line[f"params_{name}"] = r["params"]
        line[f"bytes_{name}"] = r["bytes"]
        for label in ("shm", "object_store", "disk"):
            line[f"sync_{label}_s_{name}"] = round(r[label]["warm_s"], 4)
            line[f"sync_{label}_first_s_{name}"] = round(r[label]["first_s"], 4)
            line[f"sync_{label}_publish_s_{name}"] = round(r[label]["publish_s"], 4)
            line[f"sync_{label}_load_s_{name}"] = round(r[label]["load_s"], 4)
        line[f"bare_reload_s_{name}"] = round(r["bare_reload_s"], 4)
        line[f"reload_tied_s_{name}"] = round(r["reload_tied_s"], 4)
        line[f"memcpy_s_{name}"] = round(r["memcpy_s"], 4)
    best = min(results["100m"][label]["warm_s"] for label in ("shm", "object_store", "disk"))
    line["best_backend_100m"] = min(("shm", "object_store", "disk"), key=lambda k: results["100m"][k]["warm_s"])
    line["sync_vs_reload_100m"] = round(best / results["100m"]["bare_reload_s"], 3)
    line["sync_vs_memcpy_100m"] = round(best / results["100m"]["memcpy_s"], 3)
    big = results["0p5b_bf16"]
    line["sync_vs_reload_0p5b_bf16"] = round(big["shm"]["warm_s"] / big["bare_reload_s"], 3)  # the default backend
    # Its tied LM head: reload_weights skips it, so a correct reload also re-packs it (as every sync does).
    line["sync_vs_reload_tied_0p5b_bf16"] = round(big["shm"]["warm_s"] / big["reload_tied_s"], 3)
    line["sync_object_store_vs_reload_0p5b_bf16"] = round(big["object_store"]["warm_s"] / big["bare_reload_s"], 3)
    line["sync_vs_memcpy_0p5b_bf16"] = round(big["shm"]["warm_s"] / big["memcpy_s"], 3)
    print(json.dumps(line))


if __name__ == "__main__":
    main()

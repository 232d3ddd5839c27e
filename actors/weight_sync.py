"""Weight sync: make every generator serve the learner's newest weights.

One call, ``sync_weights(learner, pool, version, sync_cfg, run_dir)``, three backends:

- ``object_store`` (default): the learner's rank 0 puts the state dict into Ray's object store
  once, as numpy arrays (no encoding); each generator maps it zero-copy and reloads. When the
  learner's rank 0 and every generator share a node (and ``sync.shm_dir`` is set), the bytes go
  through a reused buffer file in RAM-backed ``/dev/shm`` instead: one memcpy on the learner, a
  zero-copy map on the generators (``actors.shm_buffer``). Two buffers alternate, so the last published weights stay
  intact for re-syncing a restarted generator while the next ones are written.
- ``disk``: a safetensors file on a shared folder (written to a temp name, then renamed).
- ``nccl`` (GPU clusters): vLLM's weight-transfer API (``WeightTransferConfig(backend="nccl")``:
  init -> start -> update -> finish), packed into ``sync.nccl_bucket_mb`` buckets, driven by the
  learner's rank 0 through ``PoolClient``, under ``sync.timeout_s``.

Names and shapes are checked against the engine's model before a byte moves or a weight
changes: a mismatch is an error naming the first bad parameter. This is the only module that
calls vLLM's weight-loading API; it was written against vLLM ``VLLM_WEIGHT_API``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from actors.shm_buffer import map_buffer, tensor_view
from actors.weight_layout import ParamSpec, WeightMismatchError, check_params, dtype_name, dtype_of, make_spec, numpy_carrier, \
    plan_layout, safetensors_shapes

VLLM_WEIGHT_API = "0.32"
log = logging.getLogger(__name__)

# -- engine side: runs inside a generator actor --------------------------------------------------


def engine_param_spec(model_path: str) -> ParamSpec:
    """What the engine's model loads, in checkpoint naming: the local checkpoint's safetensors
    headers, or (hub ids) the state dict of a meta-device copy of the Hugging Face model."""
    path = Path(model_path).expanduser()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with open(file, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                shapes.update(safetensors_shapes(json.loads(fh.read(size))))
        return make_spec(shapes, json.loads((path / "config.json").read_text()))
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return make_spec({k: tuple(v.shape) for k, v in model.state_dict().items()}, config.to_dict())


def open_published(desc: dict) -> list[tuple[str, torch.Tensor]]:
    """The published tensors, in publication order, without copying where the transport allows."""
    kind, slots = desc["kind"], desc["slots"]
    if kind == "object_store":
        import ray

        arrays = ray.get(desc["ref"][0])
        with warnings.catch_warnings():
            # Object-store arrays are read-only; the engine only reads them.
            warnings.simplefilter("ignore", UserWarning)
            return [(s.name, torch.from_numpy(a).view(dtype_of(s.dtype)).view(s.shape)) for s, a in zip(slots, arrays)]
    if kind == "shm":
        buf = map_buffer(desc["path"])
        return [(s.name, tensor_view(buf, s)) for s in slots]
    if kind == "disk":
        from safetensors.torch import load_file

        state = load_file(desc["path"])
        return [(s.name, state[s.name]) for s in slots]
    raise ValueError(f"unknown weight publication kind {kind!r}")


def _refresh_tied(worker) -> int:
    """Re-run post-load processing of modules whose weight is tied to an earlier module's.

    A checkpoint-format reload skips a tied ``lm_head`` (checkpoints carry no weights for it), so
    a kernel that packed its weight at load time (vLLM's CPU GEMM does) would keep computing
    logits from the old embeddings. Returns how many modules were refreshed.
    """
    seen, refreshed = set(), 0
    for module in worker.get_model().modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        if method is None or not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            continue
        if weight.data_ptr() in seen:
            method.process_weights_after_loading(module)
            refreshed += 1
        seen.add(weight.data_ptr())
    return refreshed


def _reload(worker, desc: dict) -> None:
    # Runs on the vLLM worker: checkpoint-format reload repacks CPU linear layers (DESIGN.md).
    worker.reload_weights(weights_iterator=iter(open_published(desc)), is_checkpoint_format=True)
    _refresh_tied(worker)


def load_into_engine(llm, desc: dict, spec: ParamSpec) -> float:
    """Check ``desc`` against the engine's model, then reload the engine from it; returns seconds."""
    check_params([(s.name, s.shape) for s in desc["slots"]], spec)
    start = time.perf_counter()
    llm.collective_rpc(_reload, args=(desc,))
    llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
    return time.perf_counter() - start


def reload_tensors(llm, named: list[tuple[str, torch.Tensor]]) -> float:
    """The engine's floor: a bare in-process reload of tensors already in memory (benchmarks)."""
    start = time.perf_counter()
    llm.collective_rpc(lambda worker: worker.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True))
    seconds = time.perf_counter() - start
    llm.collective_rpc(_refresh_tied)
    return seconds


def engine_transfer_step(llm, step: str, payload: Any = None) -> None:
    """One step of vLLM's weight-transfer protocol on this engine (``nccl`` backend)."""
    if step == "init":
        llm.shutdown_weight_transfer_engine()  # a re-init (after a generator restart) replaces the group
        llm.init_weight_transfer_engine({"init_info": payload})
    elif step == "start":
        llm.start_weight_update()
    elif step == "update":
        llm.update_weights({"update_info": payload})
    elif step == "finish":
        llm.finish_weight_update()
        llm.collective_rpc(_refresh_tied)
        llm.reset_prefix_cache()
    else:
        raise ValueError(f"unknown weight transfer step {step!r}")


# -- learner side: shipped to the learner's workers through ``worker.apply`` ----------------------


def _state_items(worker, rank: int, spec: ParamSpec, dtype: str) -> list[tuple[str, torch.Tensor]] | None:
    state = worker.full_state_dict()  # a collective under FSDP: every rank calls it
    if rank != 0:
        return None
    names = check_params([(k, tuple(v.shape)) for k, v in state.items()], spec)
    target = dtype_of(dtype)
    return [(n, state[n].detach().to(target).contiguous()) for n in names]


def _publish(worker, rank: int, kind: str, spec: ParamSpec, dtype: str, target: str | None) -> dict | None:
    items = _state_items(worker, rank, spec, dtype)
    if items is None:
        return None
    start = time.perf_counter()
    slots, size = plan_layout([(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in items])
    desc: dict[str, Any] = {"kind": kind, "slots": slots, "bytes": sum(s.nbytes for s in slots)}
    if kind == "object_store":
        import ray

        arrays = [t.view(numpy_carrier(t.dtype)).numpy() for _, t in items]
        desc["ref"] = [ray.put(arrays)]  # in a list, so Ray hands the driver the ref, not the value
    elif kind == "shm":
        buf = map_buffer(target, size)
        for slot, (_, tensor) in zip(slots, items):
            if slot.nbytes:
                tensor_view(buf, slot).copy_(tensor)
        desc["path"] = target
    elif kind == "disk":
        from safetensors.torch import save_file

        tmp = f"{target}.tmp-{os.getpid()}"
        save_file(dict(items), tmp)
        os.replace(tmp, target)  # readers never see a half-written file
        desc["path"] = target
    desc["publish_s"] = time.perf_counter() - start
    return desc


def _node_info(worker, shm_dir: str | None) -> tuple[str, bool]:
    import ray

    return ray.get_runtime_context().get_node_id(), bool(shm_dir) and os.path.isdir(shm_dir)


def _remove(worker, paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# -- driver side --------------------------------------------------------------------------------


class Publication:
    """Weights published once and loadable by any generator of the pool, now or after a restart."""

    def __init__(self, version: int, desc: dict, timeout_s: float):
        self.version, self.desc, self.timeout_s = version, desc, timeout_s

    def apply(self, pool, indices: list[int]) -> float:
        seconds = pool._call(indices, "load_weights", self.desc, self.version, timeout=self.timeout_s,
                             what=f"loading weights version {self.version}")
        return max(seconds, default=0.0)


def _get(refs, timeout: float, what: str):
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise TimeoutError(f"weight sync: {what} did not finish within sync.timeout_s={timeout}s") from None


def _transport(learner, pool, sync_cfg, run_dir, version: int) -> tuple[str, str | None]:
    if sync_cfg.backend == "disk":
        folder = sync_cfg.disk_path or (Path(run_dir) / "sync" if run_dir is not None else None)
        if folder is None:
            raise ValueError("sync.disk_path: required for the disk backend when no run directory is given")
        Path(folder).mkdir(parents=True, exist_ok=True)
        return "disk", str(Path(folder) / f"weights-v{version:06d}.safetensors")
    node, has_shm = _get(learner.rank0.apply.remote(_node_info, sync_cfg.shm_dir), sync_cfg.timeout_s,
                         "asking the learner for its node")
    if not has_shm or any(n != node for n in pool.node_ids()):
        return "object_store", None
    current = getattr(pool.publication, "desc", {}).get("path")
    paths = [os.path.join(sync_cfg.shm_dir, f"odpo-weights-{pool.uid}-{slot}.bin") for slot in (0, 1)]
    path = paths[1] if paths[0] == current else paths[0]  # never overwrite the weights a restart may need
    pool.sync_state.setdefault("files", set()).add(path)
    return "shm", path


def sync_weights(learner, pool, version: int, sync_cfg, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Publish the learner's weights as ``version`` and make every generator of ``pool`` serve
    them. Returns seconds ``publish_s``, ``load_s``, ``total_s``, the ``bytes`` moved (for
    ``nccl`` the broadcast is all ``load_s``) and the ``path`` the weights took: ``shm`` (the
    learner's rank 0 and every generator on one node), ``object_store`` (across nodes), ``disk``
    or ``nccl``.

    Call it with no sample in flight (``collect`` first): a generator loads only after its current
    ``sample`` call, and that wait would count against ``sync.timeout_s``. A mismatched state dict
    raises ``WeightMismatchError`` before any generator changes.
    """
    start = time.perf_counter()
    if sync_cfg.backend == "nccl":
        publication: Any = NcclPublication(learner, version, sync_cfg, pool.param_spec, pool.model_cfg.dtype)
        load_s = pool.load_publication(publication)
        total = time.perf_counter() - start
        return {"publish_s": total - load_s, "load_s": load_s, "total_s": total, "bytes": float(publication.bytes),
                "path": "nccl"}
    kind, target = _transport(learner, pool, sync_cfg, run_dir, version)
    refs = [w.apply.remote(_publish, rank, kind, pool.param_spec, pool.model_cfg.dtype, target)
            for rank, w in enumerate(learner.workers)]
    desc = _get(refs, sync_cfg.timeout_s, f"the learner publishing weights version {version}")[0]
    publish_s = time.perf_counter() - start
    previous = getattr(pool.publication, "desc", {})
    load_s = pool.load_publication(Publication(version, desc, sync_cfg.timeout_s))
    if kind == "disk" and previous.get("kind") == "disk" and previous["path"] != desc["path"]:
        # The old file is no longer needed to re-sync a restarted generator.
        _get(learner.rank0.apply.remote(_remove, [previous["path"]]), sync_cfg.timeout_s, "removing old weights")
    total = time.perf_counter() - start
    log.info("weight sync v%d via %s: %.3fs (publish %.3fs, load %.3fs, %.1f MB)", version, kind, total,
             publish_s, load_s, desc["bytes"] / 1e6)
    return {"publish_s": publish_s, "load_s": load_s, "total_s": total, "bytes": float(desc["bytes"]), "path": kind}


# -- nccl backend -------------------------------------------------------------------------------


def nccl_trainer_init_info(sync_cfg, address: str, port: int, num_generators: int, tp: int, rank: int = 0):
    """vLLM's trainer-side init info: one sender (rank 0) plus every generator's TP workers."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    return NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=1 + num_generators * tp,
                               packed=True, packed_buffer_size_bytes=sync_cfg.nccl_bucket_mb << 20,
                               packed_num_buffers=2, rank=rank)


def generator_init_infos(init_info: dict, num_generators: int, tp: int) -> list[dict]:
    """vLLM sends one worker init payload with ``rank_offset=1``; each generator needs its own
    offset so that its TP workers take distinct ranks in the group."""
    base = init_info["rank_offset"]
    return [{**init_info, "rank_offset": base + i * tp} for i in range(num_generators)]


class PoolClient:
    """vLLM's ``VLLMWeightSyncClient`` over the pool's generator actors (used on the learner)."""

    def __init__(self, actors: list, tp: int, timeout_s: float):
        self.actors, self.tp, self.timeout_s, self.version = actors, tp, timeout_s, None

    def _all(self, step: str, payloads: list) -> None:
        _get([a.weight_transfer.remote(step, p, self.version) for a, p in zip(self.actors, payloads)],
             self.timeout_s, f"generators at weight transfer step {step!r}")

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all("init", generator_init_infos(init_info, len(self.actors), self.tp))

    def start_weight_update(self) -> None:
        self._all("start", [None] * len(self.actors))

    def update_weights(self, update_info) -> None:
        self._all("update", [update_info] * len(self.actors))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish", [None] * len(self.actors))


def model_source(model, spec: ParamSpec, dtype: str):
    """vLLM ``WeightSource`` over ``model``'s parameters, checked against ``spec`` (before anything
    is sent) and cast to the engine's dtype on the way out."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource, materialize_full_tensor

    target = dtype_of(dtype)

    class CheckedSource(WeightSource):
        def metadata(self):
            params = dict(model.named_parameters())
            names = check_params([(n, tuple(p.shape)) for n, p in params.items()], spec)
            return [ParamMeta(n, target, tuple(params[n].shape)) for n in names]

        def __iter__(self):
            keep = {m.name for m in self.metadata()}
            for name, param in model.named_parameters():
                if name in keep:  # the same filter on every rank keeps FSDP gathers in step
                    yield name, materialize_full_tensor(param.detach()).to(target)

    return CheckedSource()


def _nccl_endpoint(worker, port: int) -> tuple[str, int]:
    import ray

    if not port:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _nccl_trainer_init(worker, rank, sync_cfg, address, port, actors, tp, spec, dtype):
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    old = getattr(worker, "_odpo_weight_transfer", None)
    if old is not None:
        old.shutdown()
    info = nccl_trainer_init_info(sync_cfg, address, port, len(actors), tp, rank=rank)
    worker._odpo_weight_transfer = NCCLTrainerWeightTransferEngine.trainer_init(
        info, client=PoolClient(actors, tp, sync_cfg.timeout_s), source=model_source(worker.model, spec, dtype))


def _nccl_send(worker, version: int) -> int:
    engine = worker._odpo_weight_transfer
    engine.client.version = version
    meta = engine.source.metadata()  # raises on a mismatch before the generators start an update
    engine.send_weights()
    return sum(m.dtype.itemsize * math.prod(m.shape) for m in meta)


class NcclPublication:
    """NCCL weights live on the learner: (re-)applying them re-opens the group with every
    generator (a restarted one has a new process) and broadcasts again. A re-sync therefore sends
    the learner's weights as they are now: right in sync mode (nothing trains between a sync and
    the sampling it serves); in async mode a restart mid-round serves weights a few steps newer."""

    def __init__(self, learner, version: int, sync_cfg, spec: ParamSpec, dtype: str):
        self.learner, self.version, self.sync_cfg, self.spec, self.dtype = learner, version, sync_cfg, spec, dtype
        self.bytes = 0

    def apply(self, pool, indices: list[int]) -> float:
        cfg, workers = self.sync_cfg, self.learner.workers
        start = time.perf_counter()
        if pool.sync_state.get("nccl_pids") != pool.pids():
            address, port = _get(self.learner.rank0.apply.remote(_nccl_endpoint, cfg.nccl_port), cfg.timeout_s,
                                 "picking the NCCL rendezvous port")
            tp = pool.gen_cfg.tensor_parallel_size
            _get([w.apply.remote(_nccl_trainer_init, r, cfg, address, port, pool.actors, tp, self.spec, self.dtype)
                  for r, w in enumerate(workers)], cfg.timeout_s, "opening the NCCL weight-transfer group")
            pool.sync_state["nccl_pids"] = pool.pids()
        try:
            sent = _get([w.apply.remote(_nccl_send, self.version) for w in workers], cfg.timeout_s,
                        f"the NCCL broadcast of weights version {self.version}")
        except WeightMismatchError:
            raise  # found before any generator started an update: nothing to undo
        except BaseException:
            # The group is unusable and the engines are left mid-update (layers on the meta
            # device): start them fresh; the next sync opens a new group.
            pool.sync_state.pop("nccl_pids", None)
            for i in range(len(pool.actors)):
                pool.restart_actor(i, resync=False)
            raise
        self.bytes = sent[0]
        return time.perf_counter() - start

"""Publishing the learner's weights once, for every generator to load now or after a restart.

The learner's rank 0 (every rank under FSDP, where gathering is a collective) runs ``_publish``
through ``LearnerWorker.apply``: the policy's tensors, in checkpoint naming, cast to the engine's
dtype on the learner before a byte moves, are checked against the engine's spec and then

- ``object_store``: returned from that call as numpy arrays. A task's return value is owned by
  the caller, so the driver owns the published object: it outlives the learner's workers (a
  learner rebuilt after a worker died does not take the generators' weights with it);
- ``shm``: copied into a reused buffer file in RAM-backed ``/dev/shm`` (same node only; see
  ``actors.weight_sync.shm_buffer``). Two buffers alternate, so the last published weights stay intact for
  re-syncing a restarted generator while the next ones are written;
- ``disk``: written as one safetensors file on a shared folder (temp name, then renamed).

Under DDP only rank 0 is called: the other ranks make no copy.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from actors.weight_sync.shm_buffer import map_buffer, marks, marks_bytes, tensor_view
from actors.weight_sync.layout import ALIGN, ParamSpec, WeightMismatchError, check_params, dtype_of, \
    numpy_carrier, plan_layout
from actors.weight_sync.names import checkpoint_items, checkpoint_shapes

log = logging.getLogger(__name__)

# -- learner side: shipped to the learner's workers through ``worker.apply`` ----------------------


def learner_state(worker, dtype: str) -> tuple[list[tuple[str, tuple[int, ...]]], Iterator] | None:
    """The policy as ``(plan, items)``: ``plan`` lists ``(name, shape)`` in checkpoint naming,
    known before any tensor is gathered; ``items`` yields ``(name, tensor)`` in that naming, as
    CPU tensors in ``dtype`` or still in the learner's (the consumer casts: into its destination,
    in the same pass as the copy). Every rank must call it and, under FSDP, iterate ``items`` (a
    collective); only rank 0 gets them (the others get None after taking part).

    Uses the learner's streamed ``iter_full_state`` when it has one (one tensor at a time; on a
    GPU learner cast to ``dtype`` before it leaves the GPU), else ``full_state_dict()``.
    """
    model = getattr(worker, "model", None)
    # The learner's streamed export lives on its engine (``LearnerWorker.learner``); stand-ins may
    # carry it themselves.
    stream = getattr(worker, "iter_full_state", None) or getattr(getattr(worker, "learner", None), "iter_full_state", None)
    if stream is not None:
        on_gpu = model is not None and any(p.device.type == "cuda" for p in model.parameters())
        items = stream(dtype_of(dtype) if on_gpu else None)
        if getattr(worker, "rank", 0) != 0:
            for _ in items:  # take part in the gathers (rank 0 alone gets tensors)
                pass
            return None
        return checkpoint_shapes(model), checkpoint_items(model, items)
    state = worker.full_state_dict()
    if getattr(worker, "rank", 0) != 0:
        return None
    named = [(n, t.detach()) for n, t in checkpoint_items(model, state.items())]
    return [(n, tuple(t.shape)) for n, t in named], iter(named)


def learner_plan(worker) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of the policy in checkpoint naming and the order ``learner_state`` yields
    it, without gathering a tensor (stand-ins without a model: from their state dict)."""
    model = getattr(worker, "model", None)
    if model is not None:
        return checkpoint_shapes(model)
    return [(n, tuple(t.shape)) for n, t in worker.full_state_dict().items()]


def _prepare_stream(worker, spec: ParamSpec, target: str) -> dict:
    """Rank 0, before a streamed shared-memory publication: the names and shapes checked against
    the engine's spec, the buffer's layout (marks first), the file created at its size."""
    plan = learner_plan(worker)
    names = check_params(plan, spec)  # before a byte moves
    shapes = dict(plan)
    slots, size = plan_layout([(n, spec.dtype or "float32", shapes[n]) for n in names], start=marks_bytes(len(names)))
    map_buffer(target, size)
    return {"slots": slots, "writer_pid": os.getpid()}


def _publish(worker, kind: str, spec: ParamSpec, target: str | None,
             stream: dict | None = None) -> tuple[dict | None, list | None]:
    """Publish the policy as ``kind`` (rank 0) and return ``(descriptor, arrays)``; ``arrays`` are
    the object-store payload (None for other kinds, and on other ranks). ``stream`` (shared memory
    only: ``slots`` and ``token`` from ``_prepare_stream`` and the driver) marks each tensor as it
    lands, for engines that load while it is written; on any failure the tensors not written are
    marked as never coming."""
    if stream is None or getattr(worker, "rank", 0) != 0:
        return _write(worker, kind, spec, target, stream, set())
    written: set[str] = set()
    try:
        return _write(worker, kind, spec, target, stream, written)
    except BaseException:
        mark = marks(map_buffer(target), len(stream["slots"]))
        for i, slot in enumerate(stream["slots"]):
            if slot.name not in written:
                mark[i] = -stream["token"]
        raise


def _write(worker, kind: str, spec: ParamSpec, target: str | None, stream: dict | None,
           seen: set[str]) -> tuple[dict | None, list | None]:
    state = learner_state(worker, spec.dtype or "float32")
    if state is None:
        return None, None
    plan, items = state
    names = check_params(plan, spec)  # before a byte moves
    shapes = dict(plan)
    start = time.perf_counter()
    if stream is not None:
        slots = stream["slots"]
        size = slots[-1].offset + slots[-1].nbytes if slots else ALIGN
    else:
        slots, size = plan_layout([(n, spec.dtype or "float32", shapes[n]) for n in names])
    by_name = {s.name: (i, s) for i, s in enumerate(slots)}
    desc: dict[str, Any] = {"kind": kind, "slots": slots, "bytes": sum(s.nbytes for s in slots)}
    buf = map_buffer(target, None if stream is not None else size) if kind == "shm" else None
    mark = marks(buf, len(slots)) if stream is not None else None
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in items:  # streamed: names and shapes are checked again as tensors arrive
        i, slot = by_name.get(name, (None, None))
        if slot is None:
            if name in spec.optional:
                continue
            raise WeightMismatchError(f"weight sync: parameter {name!r} is not in the engine's model")
        if tuple(tensor.shape) != slot.shape or name in seen:
            raise WeightMismatchError(f"weight sync: parameter {name!r} changed shape or appeared twice while "
                                      f"gathering ({list(tensor.shape)}, expected {list(slot.shape)})")
        if buf is not None:
            if slot.nbytes:
                tensor_view(buf, slot).copy_(tensor)  # the cast to the engine's dtype happens in this copy
            if mark is not None:
                mark[i] = stream["token"]  # after the bytes: a reader that sees it sees them
        else:
            kept[name] = tensor.to(dtype_of(slot.dtype)).contiguous()
        seen.add(name)
    missing = [n for n in by_name if n not in seen]
    if missing:
        raise WeightMismatchError(f"weight sync: parameter {missing[0]!r} was not produced by the learner")
    arrays = None
    if kind == "object_store":
        arrays = [kept[s.name].view(numpy_carrier(kept[s.name].dtype)).numpy() for s in slots]
    elif kind == "shm":
        desc["path"] = target
    elif kind == "disk":
        from safetensors.torch import save_file

        tmp = f"{target}.tmp-{os.getpid()}"
        save_file({s.name: kept[s.name] for s in slots}, tmp)
        os.replace(tmp, target)  # readers never see a half-written file
        desc["path"] = target
    else:
        raise ValueError(f"unknown weight publication kind {kind!r}")
    desc["publish_s"] = time.perf_counter() - start
    return desc, arrays


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
    """Weights published once and loadable by any generator of the pool, now or after a restart
    (the descriptor holds the driver-owned object-store reference, or a file path). A streamed
    one is still being written (``pending``): engines may load it meanwhile; ``finish`` waits for
    the learner and raises its error, if any."""

    def __init__(self, version: int, desc: dict, timeout_s: float, pending: list | None = None):
        self.version, self.desc, self.timeout_s, self.pending = version, desc, timeout_s, pending

    def finish(self) -> None:
        if self.pending:
            refs, self.pending = self.pending, None
            done = get(refs, self.timeout_s, f"the learner publishing weights version {self.version}")
            self.desc["publish_s"] = done[0][0]["publish_s"]

    def apply(self, pool, indices: list[int]) -> float:
        seconds = pool._call(indices, "load_weights", self.desc, self.version, timeout=self.timeout_s,
                             what=f"loading weights version {self.version}")
        return max(seconds, default=0.0)


def get(refs, timeout: float, what: str):
    """``ray.get`` under ``sync.timeout_s``, with an error that says what did not finish."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise TimeoutError(f"weight sync: {what} did not finish within sync.timeout_s={timeout}s") from None


def publishing_workers(learner) -> list:
    """The learner workers a publication needs: every rank under FSDP (gathering is a
    collective), else rank 0 alone (the other DDP ranks hold the same weights; they copy nothing)."""
    cfg = getattr(learner, "cfg", None)
    fsdp = getattr(cfg, "strategy", "ddp") == "fsdp" and len(learner.workers) > 1
    return list(learner.workers) if fsdp else [learner.rank0]


def _transport(learner, pool, sync_cfg, run_dir, version: int) -> tuple[str, str | None]:
    if sync_cfg.backend == "disk":
        folder = sync_cfg.disk_path or (Path(run_dir) / "sync" if run_dir is not None else None)
        if folder is None:
            raise ValueError("sync.disk_path: required for the disk backend when no run directory is given")
        Path(folder).mkdir(parents=True, exist_ok=True)
        return "disk", str(Path(folder) / f"weights-v{version:06d}.safetensors")
    node, has_shm = get(learner.rank0.apply.remote(_node_info, sync_cfg.shm_dir), sync_cfg.timeout_s,
                        "asking the learner for its node")
    if not has_shm or any(n != node for n in pool.node_ids()):
        return "object_store", None
    current = getattr(pool.publication, "desc", {}).get("path")
    paths = [os.path.join(sync_cfg.shm_dir, f"odpo-weights-{pool.uid}-{slot}.bin") for slot in (0, 1)]
    path = paths[1] if paths[0] == current else paths[0]  # never overwrite the weights a restart may need
    pool.sync_state.setdefault("files", set()).add(path)
    return "shm", path


def publish_weights(learner, pool, version: int, sync_cfg, run_dir=None, stream: bool = False) -> Publication:
    """Publish the learner's weights as ``version`` for ``pool`` (object store, shared memory or
    disk, as ``sync_cfg`` and the nodes allow); nothing is loaded yet. With ``stream``, a
    shared-memory publication is returned as soon as its layout is known, still being written:
    load it right away (engines take each tensor as it lands), then call ``finish``."""
    kind, target = _transport(learner, pool, sync_cfg, run_dir, version)
    workers = publishing_workers(learner)
    if stream and kind == "shm":
        layout = get(learner.rank0.apply.remote(_prepare_stream, pool.param_spec, target), sync_cfg.timeout_s,
                     "the learner laying out the shared-memory buffer")
        token = secrets.randbits(62) + 1
        desc = {"kind": kind, "slots": layout["slots"], "bytes": sum(s.nbytes for s in layout["slots"]),
                "path": target, "token": token, "writer_pid": layout["writer_pid"], "timeout_s": sync_cfg.timeout_s}
        pending = [w.apply.remote(_publish, kind, pool.param_spec, target, {"slots": layout["slots"], "token": token})
                   for w in workers]
        return Publication(version, desc, sync_cfg.timeout_s, pending=pending)
    refs = [w.apply.options(num_returns=2).remote(_publish, kind, pool.param_spec, target) for w in workers]
    desc = get([r[0] for r in refs], sync_cfg.timeout_s, f"the learner publishing weights version {version}")[0]
    if kind == "object_store":
        desc["ref"] = [refs[0][1]]  # in a list, so that Ray hands the generator the reference, not the value
    return Publication(version, desc, sync_cfg.timeout_s)


def remove_files(learner, paths: list[str], timeout_s: float) -> None:
    """Remove files on the learner's rank-0 node (old disk publications)."""
    get(learner.rank0.apply.remote(_remove, paths), timeout_s, "removing old weights")

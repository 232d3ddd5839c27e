"""Adapter publications: with LoRA (``learner.lora``) each new policy version reaches the
generators as an adapter, never as full weights; nothing of the base model moves after start-up.

The adapter's factors (``lora_A``/``lora_B`` of each adapted layer, PEFT naming, cast to the
engine's dtype on the learner) travel by the ``object_store`` backend's two paths: a reused buffer
in ``sync.shm_dir`` when the learner's rank 0 and every generator share a node, else the object
store (a driver-owned reference). The descriptor carries the adapter's PEFT config; an engine
registers the tensors as a vLLM LoRA adapter in memory (``engine.load_adapter_into_engine``:
nothing encoded, nothing written to disk) and every sampling request then names it, so each
completion is sampled by the version it is tagged with.

Names and shapes are checked against the engine's base model before a byte moves: each factor's
layer must be one of the engine's linear weights, A ``[r, in]`` and B ``[out, r]`` of it.
"""

from __future__ import annotations

import time

from actors.weight_sync.base import LearnerRank, LearnerWorkers, PublishRequest, SyncTarget
from actors.weight_sync.layout import ParamSpec, WeightMismatchError, dtype_of, numpy_carrier, plan_layout
from actors.weight_sync.object_store import shm_path
from actors.weight_sync.shm_buffer import map_buffer, tensor_view
from actors.weight_sync.stored import StoredPublication, get, publishing_workers

PEFT_PREFIX = "base_model.model."
KINDS = {"adapter_shm": "shm", "adapter_object_store": "object_store"}
"""Publication request kinds of this module -> the path the adapter takes (``sync_path``)."""


def check_adapter(given: list[tuple[str, tuple[int, ...]]], spec: ParamSpec, max_rank: int | None = None) -> None:
    """Raise ``WeightMismatchError`` naming the first factor that does not fit the engine's base
    model (``spec``, checkpoint naming): an unknown layer, a wrong shape, a rank above ``max_rank``,
    or a layer with one factor only."""
    seen: dict[str, set[str]] = {}
    for name, shape in given:
        module, _, factor = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        base = spec.shapes.get(f"{module}.weight")
        if not name.startswith(PEFT_PREFIX) or factor not in ("A.weight", "B.weight") or base is None or len(base) != 2:
            raise WeightMismatchError(f"weight sync: adapter tensor {name!r} is not a LoRA factor of a linear layer "
                                      "of the engine's model")
        out, inp = base
        rank = shape[0] if factor == "A.weight" else shape[-1]
        want = (rank, inp) if factor == "A.weight" else (out, rank)
        if tuple(shape) != want:
            raise WeightMismatchError(f"weight sync: adapter tensor {name!r} has shape {list(shape)}, the engine's "
                                      f"{module} ({out} x {inp}) takes {list(want)}")
        if max_rank is not None and rank > max_rank:
            raise WeightMismatchError(f"weight sync: adapter tensor {name!r} has rank {rank}, above the engine's "
                                      f"max_lora_rank {max_rank}")
        seen.setdefault(module, set()).add(factor)
    for module, factors in seen.items():
        if len(factors) != 2:
            raise WeightMismatchError(f"weight sync: adapter of {module} has {sorted(factors)} only")


# -- on the learner's ranks ---------------------------------------------------------------------


def write_adapter(learner: LearnerRank, request: PublishRequest) -> tuple[dict | None, list | None]:
    """Publish the adapter as ``request`` says: into the buffer at ``request.path``
    (``adapter_shm``) or as object-store arrays (``adapter_object_store``). Every publishing rank
    calls it (under FSDP the factors are gathered); ``(descriptor, arrays)`` on rank 0."""
    dtype = dtype_of(request.spec.dtype or "float32")
    tensors = [(name, t) for name, t in learner.adapters.iter_peft(dtype)]
    if learner.rank != 0:
        return None, None
    start = time.perf_counter()
    check_adapter([(n, tuple(t.shape)) for n, t in tensors], request.spec)  # before a byte moves
    slots, size = plan_layout([(n, request.spec.dtype or "float32", tuple(t.shape)) for n, t in tensors])
    kind = KINDS[request.kind]
    desc = {"kind": kind, "slots": slots, "bytes": sum(s.nbytes for s in slots),
            "adapter": learner.adapters.peft_config(None)}
    if kind == "shm":
        buf = map_buffer(request.path, size)
        for slot, (_, t) in zip(slots, tensors):
            tensor_view(buf, slot).copy_(t)
        return {**desc, "path": request.path, "publish_s": time.perf_counter() - start}, None
    arrays = [t.contiguous().view(numpy_carrier(t.dtype)).numpy() for _, t in tensors]
    return {**desc, "publish_s": time.perf_counter() - start}, arrays


# -- on the driver ------------------------------------------------------------------------------


def publish(learner: LearnerWorkers, target: SyncTarget, version: int, sync_cfg) -> StoredPublication:
    """Publish the learner's adapter as ``version`` for ``target`` (shared memory on one node,
    else the object store); nothing is loaded yet."""
    path = shm_path(learner, target, sync_cfg)
    request = PublishRequest("adapter_object_store" if path is None else "adapter_shm", target.param_spec, path)
    refs = [w.publish_weights.options(num_returns=2).remote(request) for w in publishing_workers(learner)]
    desc = get([r[0] for r in refs], sync_cfg.timeout_s, f"the learner publishing adapter version {version}")[0]
    if desc["kind"] == "object_store":
        desc["ref"] = [refs[0][1]]  # in a list, so that Ray hands the generator the reference, not the value
    return StoredPublication(version, desc, sync_cfg.timeout_s)

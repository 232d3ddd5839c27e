"""The ``object_store`` backend (the default), with its same-node shared-memory path.

- Object store: the publishing call returns the policy as numpy arrays (cast to the engine's
  dtype). A task's return value is owned by the caller, so the driver owns the published object:
  it outlives the learner's workers (a learner rebuilt after a worker died does not take the
  generators' weights with it).
- Shared memory (``shm``), when the learner's rank 0 and every generator share a node and
  ``sync.shm_dir`` exists: the tensors are copied into a reused buffer file there
  (``shm_buffer``). Two buffers alternate, so the weights a restarted generator may need stay
  intact while the next ones are written. A full sync streams it: the buffer is laid out first
  (``prepare_stream``), then each tensor is marked once written and the engines load it while
  the next one is written; on a failure the tensors not written are marked as never coming.
"""

from __future__ import annotations

import os
import secrets
import time

from actors.weight_sync.base import LearnerRank, LearnerWorkers, PublishRequest, SyncTarget
from actors.weight_sync.layout import ParamSpec, check_params, numpy_carrier, plan_layout
from actors.weight_sync.shm_buffer import map_buffer, marks, marks_bytes, tensor_view
from actors.weight_sync.stored import StoredPublication, export_policy, get, kept_tensors, policy_plan, \
    publishing_workers

# -- on the learner's ranks ---------------------------------------------------------------------


def write_object(learner: LearnerRank, request: PublishRequest) -> tuple[dict | None, list | None]:
    """``(descriptor, arrays)`` on rank 0: the arrays are the object-store payload."""
    export = export_policy(learner, request.spec)
    if export is None:
        return None, None
    start = time.perf_counter()
    kept = kept_tensors(export)
    arrays = [kept[s.name].view(numpy_carrier(kept[s.name].dtype)).numpy() for s in export.slots]
    return export.descriptor("object_store", start), arrays


def node_info(shm_dir: str | None) -> tuple[str, bool]:
    """This process's Ray node, and whether ``shm_dir`` exists on it."""
    import ray

    return ray.get_runtime_context().get_node_id(), bool(shm_dir) and os.path.isdir(shm_dir)


def prepare_stream(learner: LearnerRank, spec: ParamSpec, path: str) -> dict:
    """Rank 0, before a streamed publication: the names and shapes checked against the engine's
    spec, the buffer's layout (marks first), the file created at its size."""
    plan = policy_plan(learner)
    names = check_params(plan, spec)  # before a byte moves
    shapes = dict(plan)
    slots, size = plan_layout([(n, spec.dtype or "float32", shapes[n]) for n in names], start=marks_bytes(len(names)))
    map_buffer(path, size)
    return {"slots": slots, "writer_pid": os.getpid()}


def write_shm(learner: LearnerRank, request: PublishRequest) -> tuple[dict | None, None]:
    """Copy the policy into the buffer at ``request.path`` (rank 0); streamed when the request
    carries a token. Returns ``(descriptor, None)``."""
    written: set[str] = set()
    if request.token is None or learner.rank != 0:
        return _write_shm(learner, request, written)
    try:
        return _write_shm(learner, request, written)
    except BaseException:
        mark = marks(map_buffer(request.path), len(request.slots))
        for i, slot in enumerate(request.slots):
            if slot.name not in written:
                mark[i] = -request.token
        raise


def _write_shm(learner: LearnerRank, request: PublishRequest, written: set[str]) -> tuple[dict | None, None]:
    export = export_policy(learner, request.spec, request.slots)
    if export is None:
        return None, None
    start = time.perf_counter()
    streamed = request.token is not None
    buf = map_buffer(request.path, None if streamed else export.size)
    mark = marks(buf, len(export.slots)) if streamed else None
    for i, slot, tensor in export:
        if slot.nbytes:
            tensor_view(buf, slot).copy_(tensor)  # the cast to the engine's dtype happens in this copy
        if mark is not None:
            mark[i] = request.token  # after the bytes: a reader that sees it sees them
        written.add(slot.name)
    return export.descriptor("shm", start, path=request.path), None


# -- on the driver ------------------------------------------------------------------------------


def shm_path(learner: LearnerWorkers, target: SyncTarget, sync_cfg) -> str | None:
    """The buffer to publish into, or None when the object store must carry the weights (the
    learner's rank 0 and the generators on different nodes, or no ``sync.shm_dir``). Never the
    buffer the target's current weights live in; the path is recorded for removal at shutdown."""
    node, has_shm = get(learner.rank0.node_info.remote(sync_cfg.shm_dir), sync_cfg.timeout_s,
                        "asking the learner for its node")
    if not has_shm or any(n != node for n in target.node_ids()):
        return None
    state = target.sync_state
    current = state.publication.desc.get("path") if isinstance(state.publication, StoredPublication) else None
    paths = [os.path.join(sync_cfg.shm_dir, f"odpo-weights-{state.uid}-{slot}.bin") for slot in (0, 1)]
    path = paths[1] if paths[0] == current else paths[0]
    state.files.add(path)
    return path


def publish(learner: LearnerWorkers, target: SyncTarget, version: int, sync_cfg,
            stream: bool = False) -> StoredPublication:
    """Publish the learner's weights as ``version`` for ``target`` (shared memory or the object
    store); nothing is loaded yet. With ``stream``, a shared-memory publication is returned as
    soon as its layout is known, still being written: load it right away, then ``finish`` it."""
    spec, timeout = target.param_spec, sync_cfg.timeout_s
    path = shm_path(learner, target, sync_cfg)
    workers = publishing_workers(learner)
    if path is not None and stream:
        layout = get(learner.rank0.prepare_weight_stream.remote(spec, path), timeout,
                     "the learner laying out the shared-memory buffer")
        request = PublishRequest("shm", spec, path, layout["slots"], secrets.randbits(62) + 1)
        desc = {"kind": "shm", "slots": request.slots, "bytes": sum(s.nbytes for s in request.slots), "path": path,
                "token": request.token, "writer_pid": layout["writer_pid"], "timeout_s": timeout}
        pending = [w.publish_weights.remote(request) for w in workers]
        return StoredPublication(version, desc, timeout, pending=pending)
    request = PublishRequest("object_store" if path is None else "shm", spec, path)
    refs = [w.publish_weights.options(num_returns=2).remote(request) for w in workers]
    desc = get([r[0] for r in refs], timeout, f"the learner publishing weights version {version}")[0]
    if request.kind == "object_store":
        desc["ref"] = [refs[0][1]]  # in a list, so that Ray hands the generator the reference, not the value
    return StoredPublication(version, desc, timeout)

"""Weight sync: make every generator serve the learner's newest weights.

One call, ``sync_weights(learner, pool, version, sync_cfg, run_dir)``, over the contract written
down in ``base`` (``Publication``, ``SyncTarget``, ``SyncState``, the learner's named methods),
three backends, one file each:

- ``object_store`` (default): the learner publishes once, the driver owns the published object,
  each generator maps it zero-copy and reloads; when the learner's rank 0 and every generator
  share a node, a reused buffer file in ``/dev/shm`` is the fast path, streamed (the engines load
  each tensor as soon as the learner has written it).
- ``disk``: a safetensors file on a shared folder.
- ``nccl`` (GPU clusters): vLLM's weight-transfer API in sessions keyed on who takes part.

With LoRA (``learner.lora``) a version is an adapter, not weights: ``adapter`` publishes it by the
``object_store`` backend's two paths, and the engines register it as their LoRA adapter.

Weights move in checkpoint naming (``names``: what the engine's checkpoint files hold, which is
what vLLM maps) and in the engine's dtype (``generator.dtype``), cast once on the learner. Names,
shapes and dtype are checked against the engine's model before a byte moves or a weight changes:
a mismatch is an error naming the first bad parameter. An engine whose streamed load stops
part-way (the learner failed or died mid-publication) goes back to the last weights it loaded in
full before the error is raised (``engine``).

This package is the only code that calls vLLM's weight-loading API (``engine`` and ``nccl``); it
was written against vLLM ``VLLM_WEIGHT_API``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from actors.weight_sync import adapter, disk, object_store
from actors.weight_sync.base import EngineGroup, LearnerRank, LearnerWorkers, Publication, PublishRequest, \
    SyncState, SyncTarget
from actors.weight_sync.engine import PublicationAborted, engine_param_spec, engine_transfer_step, \
    load_adapter_into_engine, load_into_engine, open_published, reload_tensors, restore_engine
from actors.weight_sync.nccl import NcclPublication, nccl_endpoint, open_nccl_sender, send_nccl
from actors.weight_sync.object_store import node_info, prepare_stream
from actors.weight_sync.stored import remove_files

VLLM_WEIGHT_API = "0.32"
log = logging.getLogger(__name__)

__all__ = ["sync_weights", "publish", "publish_rank", "Publication", "SyncState", "SyncTarget", "EngineGroup",
           "LearnerRank", "LearnerWorkers", "PublishRequest", "NcclPublication", "PublicationAborted",
           "engine_param_spec", "engine_transfer_step", "load_adapter_into_engine", "load_into_engine",
           "open_published", "reload_tensors", "restore_engine", "node_info", "prepare_stream", "remove_files", "nccl_endpoint", "open_nccl_sender",
           "send_nccl", "VLLM_WEIGHT_API"]


def publish(learner: LearnerWorkers, target: SyncTarget, version: int, sync_cfg, run_dir: str | Path | None = None,
            stream: bool = False) -> Publication:
    """The learner's weights as ``version``, published for ``target`` by ``sync_cfg.backend``
    (nothing loaded yet; an ``nccl`` publication sends when applied). ``stream``: a
    shared-memory publication may come back still being written (load it, then ``finish``)."""
    if getattr(learner.cfg, "lora", None) is not None:
        return adapter.publish(learner, target, version, sync_cfg)
    if sync_cfg.backend == "nccl":
        return NcclPublication(learner, version, sync_cfg, target.param_spec)
    if sync_cfg.backend == "disk":
        return disk.publish(learner, target, version, sync_cfg, run_dir)
    return object_store.publish(learner, target, version, sync_cfg, stream=stream)


_WRITERS = {"object_store": object_store.write_object, "shm": object_store.write_shm, "disk": disk.write_file,
            **{kind: adapter.write_adapter for kind in adapter.KINDS}}


def publish_rank(learner: LearnerRank, request: PublishRequest) -> tuple[dict | None, list | None]:
    """On each publishing rank (``LearnerWorker.publish_weights``): publish the policy as the
    request says; ``(descriptor, object-store arrays)`` on rank 0, ``(None, None)`` elsewhere."""
    writer = _WRITERS.get(request.kind)
    if writer is None:
        raise ValueError(f"unknown weight publication kind {request.kind!r}")
    return writer(learner, request)


def sync_weights(learner: LearnerWorkers, pool: SyncTarget, version: int, sync_cfg,
                 run_dir: str | Path | None = None) -> dict[str, Any]:
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
    previous = pool.sync_state.publication
    publication = publish(learner, pool, version, sync_cfg, run_dir, stream=True)
    try:
        load_s = pool.load_publication(publication)  # a streamed publication loads while it is written
    finally:
        publication.finish()  # the learner's own error, when it failed first, says more
    publication.release_previous(previous)
    total = time.perf_counter() - start
    publish_s = publication.publish_s if publication.publish_s is not None else total - load_s
    what = "adapter" if getattr(publication, "desc", {}).get("adapter") else "weights"
    log.info("weight sync v%d (%s) via %s: %.3fs (publish %.3fs, load %.3fs, %.1f MB)", version, what, publication.kind,
             total, publish_s, load_s, publication.bytes / 1e6)
    return {"publish_s": publish_s, "load_s": load_s, "total_s": total, "bytes": float(publication.bytes),
            "path": publication.kind}

"""Weight sync: make every generator serve the learner's newest weights.

One call, ``sync_weights(learner, pool, version, sync_cfg, run_dir)``, three backends:

- ``object_store`` (default): the learner publishes once, the driver owns the published object,
  each generator maps it zero-copy and reloads; when the learner's rank 0 and every generator
  share a node, a reused buffer file in ``/dev/shm`` is the fast path (``publish``).
- ``disk``: a safetensors file on a shared folder (``publish``).
- ``nccl`` (GPU clusters): vLLM's weight-transfer API in sessions keyed on who takes part
  (``nccl``).

Weights move in checkpoint naming (``names``: what the engine's checkpoint files hold, which is
what vLLM maps) and in the engine's dtype (``generator.dtype``), cast once on the learner. Names,
shapes and dtype are checked against the engine's model before a byte moves or a weight changes:
a mismatch is an error naming the first bad parameter.

A shared-memory publication is streamed: the generators load each tensor as soon as the learner
has written it (``publish`` marks it), so the cast-and-copy overlaps the engines' reload. An
engine whose load stops part-way (the learner failed or died mid-publication) goes back to the
last weights it loaded in full before the error is raised.

This package is the only code that calls vLLM's weight-loading API (``engine`` and ``nccl``); it
was written against vLLM ``VLLM_WEIGHT_API``.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from pathlib import Path

from actors.weight_sync.engine import PublicationAborted, engine_param_spec, engine_transfer_step, load_into_engine, \
    open_published, reload_tensors, restore_engine
from actors.weight_sync.nccl import NcclPublication
from actors.weight_sync.publish import Publication, _remove, publish_weights, remove_files

VLLM_WEIGHT_API = "0.32"
log = logging.getLogger(__name__)

__all__ = ["sync_weights", "Publication", "NcclPublication", "PublicationAborted", "engine_param_spec",
           "engine_transfer_step", "load_into_engine", "open_published", "reload_tensors", "restore_engine",
           "VLLM_WEIGHT_API", "_remove"]


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
        nccl = NcclPublication(learner, version, sync_cfg, pool.param_spec, run_dir)
        load_s = pool.load_publication(nccl)
        total = time.perf_counter() - start
        return {"publish_s": total - load_s, "load_s": load_s, "total_s": total, "bytes": float(nccl.bytes),
                "path": "nccl"}
    publication = publish_weights(learner, pool, version, sync_cfg, run_dir, stream=True)
    desc = publication.desc
    previous = getattr(pool.publication, "desc", {})
    try:
        load_s = pool.load_publication(publication)  # a streamed publication loads while it is written
    except BaseException:
        publication.finish()  # the learner's own error, when it failed first, says more
        raise
    publication.finish()
    publish_s = desc.get("publish_s", time.perf_counter() - start)
    if desc["kind"] == "disk" and previous.get("kind") == "disk" and previous["path"] != desc["path"]:
        # The old file is no longer needed to re-sync a restarted generator.
        remove_files(learner, [previous["path"]], sync_cfg.timeout_s)
    total = time.perf_counter() - start
    log.info("weight sync v%d via %s: %.3fs (publish %.3fs, load %.3fs, %.1f MB)", version, desc["kind"], total,
             publish_s, load_s, desc["bytes"] / 1e6)
    return {"publish_s": publish_s, "load_s": load_s, "total_s": total, "bytes": float(desc["bytes"]),
            "path": desc["kind"]}

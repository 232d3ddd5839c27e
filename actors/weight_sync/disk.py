"""The ``disk`` backend: one safetensors file per version on a shared folder (``sync.disk_path``,
default ``<run dir>/sync``), written under a temporary name and renamed (readers never see half a
file). Once every generator has loaded a new version, the previous file is removed on the
learner's rank-0 node: it is no longer needed to re-sync a restarted generator.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from actors.weight_sync.base import LearnerRank, LearnerWorkers, Publication, PublishRequest, SyncTarget
from actors.weight_sync.stored import StoredPublication, export_policy, get, kept_tensors, publishing_workers


def write_file(learner: LearnerRank, request: PublishRequest) -> tuple[dict | None, None]:
    """On the learner's ranks: write the policy to ``request.path`` (rank 0); ``(descriptor, None)``."""
    from safetensors.torch import save_file

    export = export_policy(learner, request.spec)
    if export is None:
        return None, None
    start = time.perf_counter()
    kept = kept_tensors(export)
    tmp = f"{request.path}.tmp-{os.getpid()}"
    save_file({s.name: kept[s.name] for s in export.slots}, tmp)
    os.replace(tmp, request.path)  # readers never see a half-written file
    return export.descriptor("disk", start, path=request.path), None


def file_path(sync_cfg, run_dir: str | Path | None, version: int) -> str:
    """Where version ``version`` is written (the folder is created)."""
    folder = sync_cfg.disk_path or (Path(run_dir) / "sync" if run_dir is not None else None)
    if folder is None:
        raise ValueError("sync.disk_path: required for the disk backend when no run directory is given")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return str(Path(folder) / f"weights-v{version:06d}.safetensors")


class DiskPublication(StoredPublication):
    """A file on the shared folder; removes the file it replaces."""

    def __init__(self, learner: LearnerWorkers, version: int, desc: dict, timeout_s: float):
        super().__init__(version, desc, timeout_s)
        self.learner = learner

    def release_previous(self, previous: Publication | None) -> None:
        if isinstance(previous, DiskPublication) and previous.desc["path"] != self.desc["path"]:
            get(self.learner.rank0.remove_sync_files.remote([previous.desc["path"]]), self.timeout_s,
                "removing old weights")


def publish(learner: LearnerWorkers, target: SyncTarget, version: int, sync_cfg,
            run_dir: str | Path | None = None) -> DiskPublication:
    """Write the learner's weights as ``version`` for ``target``; nothing is loaded yet."""
    request = PublishRequest("disk", target.param_spec, file_path(sync_cfg, run_dir, version))
    refs = [w.publish_weights.remote(request) for w in publishing_workers(learner)]
    desc = get(refs, sync_cfg.timeout_s, f"the learner publishing weights version {version}")[0][0]
    return DiskPublication(learner, version, desc, sync_cfg.timeout_s)

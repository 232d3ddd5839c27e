"""Resident memory, now and peak, of the driver and of every actor on the driver's node, for each
round's record.

Actor pids are asked for once and again only after a restart (asking a busy actor would queue
behind its work); a process on another node, or one that is gone, is simply left out.
"""

from __future__ import annotations

import os

import psutil


def _whereabouts(_actor_self) -> tuple[int, str]:
    import ray

    return os.getpid(), ray.get_runtime_context().get_node_id()


class ProcessMemory:
    def __init__(self):
        self._pids: dict[str, int] = {}
        self._key = None
        self.peaks: dict[str, float] = {}

    def _refresh(self, handles: dict) -> None:
        import ray

        refs = {name: h.__ray_call__.remote(_whereabouts) for name, h in handles.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=5)
        here = ray.get_runtime_context().get_node_id()
        pids = {}
        for name, ref in refs.items():
            if ref in ready:
                try:
                    pid, node = ray.get(ref, timeout=1)
                except Exception:  # an actor that died meanwhile: measured next time
                    continue
                if node == here:
                    pids[name] = pid
        self._pids = pids

    def sample(self, handles: dict, restarts: dict) -> dict[str, float]:
        """RSS in MiB by process name (``driver``, ``generator_0``, ``learner_1``, ...); each
        process's peak RSS so far is then in ``peaks``."""
        key = (tuple(sorted(handles)), tuple(sorted(restarts.items())))
        if key != self._key:
            self._refresh(handles)
            self._key = key
        out = {"driver": psutil.Process().memory_info().rss / 2**20}
        peaks = {"driver": peak_rss_mb(os.getpid())}
        for name, pid in self._pids.items():
            try:
                out[name] = psutil.Process(pid).memory_info().rss / 2**20
            except psutil.Error:
                continue
            peaks[name] = peak_rss_mb(pid)
        self.peaks = {k: round(v, 1) for k, v in peaks.items() if v is not None}
        return {k: round(v, 1) for k, v in out.items()}


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory in MiB (Linux ``VmHWM``); None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def actor_handles(parts) -> dict:
    handles = {}
    for kind, group in (("generator", getattr(parts.generators, "actors", [])),
                        ("judge", getattr(parts.judges, "actors", [])),
                        ("learner", getattr(parts.learner, "workers", []))):
        for i, handle in enumerate(group):
            handles[f"{kind}_{i}"] = handle
    return handles

"""Waiting for actors out loud: while a start (or restart) is awaited, say every 30 s which actor
is still not ready, what Ray reports for it, and what it asks of the cluster.

Without this, an actor that Ray cannot place (its node was lost, another job holds the GPUs, a
custom resource no node has) is silent until its start timeout, often 15 minutes. One helper for
the three places that wait for actors: ``GeneratorPool._await_ready``, the learner group's
placement group, and the judge pool's start.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

INTERVAL_S = 30.0
"""Seconds between two reports of one wait."""

# What Ray's states mean for someone waiting (actor table and placement group table).
_MEANING = {
    "PENDING": "not placed yet",  # a placement group's bundles
    "RESCHEDULING": "being placed again (a node it used was lost)",
    "DEPENDENCIES_UNREADY": "waiting for its constructor's arguments",
    "RESTARTING": "restarting after its process or node died",
    "ALIVE": "started; still answering an earlier call",
    "CREATED": "placed",
    "DEAD": "dead",
    "REMOVED": "removed",
}


def demand_of(num_cpus: float, num_gpus: float, resources: dict[str, float] | None = None) -> dict[str, float]:
    """One actor's Ray resources as a dict (zeros left out)."""
    pairs = [("CPU", num_cpus), ("GPU", num_gpus), *(resources or {}).items()]
    return {key: float(value) for key, value in pairs if value}


def describe_state(thing: Any) -> str:
    """What Ray reports for an actor handle or a placement group, in words ('state unknown' when
    it cannot be read)."""
    try:
        if hasattr(thing, "bundle_specs"):  # a placement group
            from ray.util.placement_group import placement_group_table

            state = placement_group_table(thing).get("state")
            return _MEANING.get(state, state or "state unknown")
        # The actor table is read from the GCS directly (ray.util.state would need the dashboard,
        # which a local cluster runs without).
        from ray._private.state import actors

        info = actors(actor_id=thing._actor_id.hex())
    except Exception:  # a report must never break the wait it reports on
        return "state unknown"
    state, pid = info.get("State"), info.get("Pid") or 0
    if state == "PENDING_CREATION":
        # A process is assigned once the actor is placed and its worker has started.
        if pid:
            return f"placed (pid {pid}); its constructor is still running"
        return "no process yet: not placed, or its worker is starting"
    return _MEANING.get(state, state or "state unknown")


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items()) or "no resources"


class ActorWait:
    """One wait for one or more actors (or a placement group), reported every ``INTERVAL_S``.

    ``waited``: ``(name, actor handle or placement group)`` per thing awaited, in the order of the
    refs later handed to ``get``; ``demand``: the Ray resources each asks for; ``limit``: the
    config field that bounds the wait, as the report names it (``generator.start_timeout_s=900``).
    """

    def __init__(self, waited: list[tuple[str, Any]], demand: dict[str, float], limit: str,
                 interval_s: float | None = None):
        self.waited, self.demand, self.limit = waited, demand, limit
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.started = time.monotonic()
        self._next = self.started + self.interval_s
        self.reports: list[str] = []

    def get(self, refs: Any, timeout: float) -> Any:
        """``ray.get(refs, timeout=timeout)`` (same result, same exceptions), reporting the refs
        still pending every interval. ``refs``: one ref or a list, one per entry of ``waited``."""
        import ray

        every = refs if isinstance(refs, list) else [refs]
        deadline = time.monotonic() + timeout
        pending = list(every)
        while pending:
            now = time.monotonic()
            if now >= deadline:
                break
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, min(deadline, self._next) - now))
            if pending and time.monotonic() >= self._next:
                self.report([i for i, ref in enumerate(every) if ref in pending])
                self._next += self.interval_s
        return ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))

    def tick(self) -> None:
        """Report every entry if one is due (for waits that poll between ``get`` calls)."""
        if time.monotonic() >= self._next:
            self.report(range(len(self.waited)))
            self._next += self.interval_s

    def report(self, indices) -> str:
        import ray

        waited_s = time.monotonic() - self.started
        parts = []
        for i in indices:
            name, thing = self.waited[i]
            parts.append(f"{name} ({describe_state(thing) if thing is not None else 'state unknown'})")
        try:
            free, total = ray.available_resources(), ray.cluster_resources()
            short = [k for k, v in self.demand.items() if float(free.get(k, 0.0)) + 1e-9 < v]
            have = ", ".join(f"{float(free.get(k, 0.0)):g} of {float(total.get(k, 0.0)):g} {k} free" for k in self.demand)
            have = f"the cluster has {have}" if have else ""
            if short:
                have += f" (short of {', '.join(short)})"
        except Exception:  # as in describe_state: the report is best effort
            have = ""
        line = (f"still waiting after {waited_s:.0f} s (limit {self.limit}) for {'; '.join(parts)}: "
                f"each asks for {_amounts(self.demand)}{'; ' + have if have else ''}")
        log.warning(line)
        self.reports.append(line)
        return line

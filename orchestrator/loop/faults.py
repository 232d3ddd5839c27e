"""The fault-injection switch (config ``faults.events``): rehearse failures on purpose.

Each event fires once, in its round, at the point where that kind of part is in use, through the
same means a real failure would take (``ray.kill`` of an actor, a call that outlasts its timeout,
a judge or learner that raises, a NaN loss), so the recovery paths that run are the production ones.
"""

from __future__ import annotations

import logging

log = logging.getLogger("odpo.faults")

# The loop calls ``fire(point, ...)`` at these points of a round; each kind fires at one of them.
POINT = {"generator": "sample", "judge": "judge", "learner": "learn", "sync": "sync", "rundir": "write",
         "disk": "checkpoint"}


def _arm_load_delay(actor_self, seconds: float) -> None:
    actor_self.fault_delay_next_load_s = seconds


def _arm_load_raise(actor_self) -> None:
    actor_self.fault_raise_next_load = True


def _arm_judge_raise(actor_self, calls: int) -> None:
    actor_self.fault_raise_calls = calls


class FaultInjector:
    def __init__(self, faults_cfg):
        self.pending = list(faults_cfg.events)
        self.fired: list[dict] = []

    def fire(self, point: str, round_: int, parts) -> None:
        for ev in [e for e in self.pending if e.round == round_ and POINT[e.kind] == point]:
            self.pending.remove(ev)
            log.warning("fault injection: %s %s #%d in round %d", ev.action, ev.kind, ev.index, round_)
            _fire(ev, parts)
            self.fired.append(ev.model_dump())

    def free_bytes(self, round_: int) -> int | None:
        """The free space a ``disk`` event makes the checkpoints from its round on see: 0 (a full
        disk stays full); None without one (the file system's own figure)."""
        for ev in [e for e in self.pending if e.kind == "disk" and e.round <= round_]:
            self.pending.remove(ev)
            log.warning("fault injection: the disk is full from the checkpoint of round %d on", round_)
            self.fired.append(ev.model_dump())
        return 0 if any(e["kind"] == "disk" for e in self.fired) else None


def _fire(ev, parts) -> None:
    import ray

    if ev.kind == "generator":
        ray.kill(parts.generators.actors[ev.index], no_restart=False)  # a crash: Ray restarts it
    elif ev.kind == "judge" and ev.action == "kill":
        ray.kill(parts.judges.actors[ev.index], no_restart=True)  # the process is gone for good
    elif ev.kind == "judge":
        ray.get(parts.judges.actors[ev.index].__ray_call__.remote(_arm_judge_raise, ev.count), timeout=30)
    elif ev.kind == "learner" and ev.action == "kill":
        ray.kill(parts.learner.workers[ev.index], no_restart=True)
    elif ev.kind == "learner" and ev.action == "raise":
        parts.learner.inject_raise(ev.after_steps)
    elif ev.kind == "learner" and ev.action == "nan_weights":
        parts.learner.inject_nan_weights()
    elif ev.kind == "learner":
        parts.learner.inject_nan(ev.count)
    elif ev.kind == "sync" and ev.action == "raise":
        ray.get(parts.generators.actors[ev.index].__ray_call__.remote(_arm_load_raise), timeout=30)
    elif ev.kind == "sync":
        ray.get(parts.generators.actors[ev.index].__ray_call__.remote(_arm_load_delay, ev.seconds), timeout=30)
    elif ev.kind == "rundir":  # the round's outputs cannot be written, as on a full disk
        raise OSError(28, "No space left on device (injected: faults.events) writing the round's pairs")

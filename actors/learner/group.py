"""``LearnerGroup``: N ``LearnerWorker`` actors in one placement group, driven as one learner.

Every call fans out to all workers at once (the ranks run collectives together) and waits with
``learner.timeout_s``; a worker that dies surfaces as Ray's actor error, and the caller rebuilds
the group from the last checkpoint (workers are never restarted in place: a lone restarted rank
could not rejoin the process group).
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learner.worker import LearnerWorker
from actors.placement import PlacementError, why_unplaced
from actors.waiting import ActorWait, demand_of


class LearnerGroup:
    def __init__(self, model_cfg: Any, learner_cfg: Any, seed: int = 0):
        cfg = self.cfg = learner_cfg
        bundle = demand_of(cfg.num_cpus_per_worker, cfg.num_gpus_per_worker, cfg.resources)
        if not bundle:
            raise ValueError("learner.num_cpus_per_worker and learner.num_gpus_per_worker are both 0: "
                             "a worker needs some resource to be placed")
        self.workers: list = []
        self._pg = placement_group([dict(bundle) for _ in range(cfg.num_workers)], strategy="PACK")
        try:
            what = f"placement group of {cfg.num_workers} x {bundle}"
            waiting = ActorWait([(f"learner {what}", self._pg)], bundle, f"learner.timeout_s={cfg.timeout_s:g}")
            try:
                waiting.get(self._pg.ready(), timeout=cfg.timeout_s)
            except GetTimeoutError:
                why = why_unplaced(bundle)  # no alive node could ever hold a worker (e.g. its node was lost)
                raise (PlacementError if why else TimeoutError)(
                    f"learner: {what} was not placed within learner.timeout_s={cfg.timeout_s:g}s "
                    f"({why or 'no room for it on the cluster'})") from None
            self.workers = [
                LearnerWorker.options(
                    num_cpus=cfg.num_cpus_per_worker, num_gpus=cfg.num_gpus_per_worker,
                    resources=dict(cfg.resources),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
                ).remote(model_cfg, cfg, seed, i, cfg.num_workers)
                for i in range(cfg.num_workers)
            ]
            addr, port = self._get(self.workers[0].master_endpoint.remote(), "rank 0 endpoint")
            self._get([w.setup.remote(addr, port) for w in self.workers], "setup")
        except BaseException:
            self.shutdown()
            raise

    @property
    def rank0(self):
        """The rank-0 worker actor (holds full weights under DDP; writes checkpoints)."""
        return self.workers[0]

    def _get(self, refs, what: str):
        """Wait for one ref or a list; a worker's error surfaces as soon as it happens (the other
        ranks may be blocked in a collective with the dead one and would never answer)."""
        single = not isinstance(refs, list)
        waiting = [refs] if single else list(refs)
        deadline = time.monotonic() + self.cfg.timeout_s
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                limit = self.cfg.timeout_s
                raise TimeoutError(f"learner: {what} did not finish within learner.timeout_s={limit}s")
            ray.get(ready[0])  # raises that worker's error now
        out = ray.get(refs)
        return out

    def _all(self, method: str, *args, what: str) -> list:
        return self._get([getattr(w, method).remote(*args) for w in self.workers], what)

    def train(self, pairs: list, round: int, beta: float | None = None) -> dict[str, Any]:
        """One round of DPO steps on ``pairs`` (the global batch); returns rank 0's report.
        ``beta``: the round's β when ``learner.beta`` is a schedule (none = the configured number)."""
        ref = ray.put(pairs)
        return self._all("train", ref, round, beta, what=f"train(round={round})")[0]

    def evaluate(self, pairs: list, beta: float | None = None) -> dict[str, Any]:
        """Loss, rewards and accuracy of ``pairs`` under the current policy, without a step."""
        return self._all("evaluate", ray.put(pairs), beta, what="evaluate")[0]

    def save(self, path: str) -> None:
        """Checkpoint to ``path``: ``state/`` (each rank's shards), ``policy/`` (HF format), ``trainer.json``."""
        self._all("save", path, what=f"save({path})")

    def load(self, path: str) -> None:
        """Restore the policy, reference, optimizer and scheduler saved by ``save`` on every worker."""
        self._all("load", path, what=f"load({path})")

    def set_lr(self, lr: float) -> None:
        """Every rank trains with ``lr`` as ``learner.lr`` from its next step on (a live change)."""
        self.cfg.lr = lr  # a group rebuilt from this config starts with it too
        self._all("set_lr", lr, what="set_lr")

    def alive(self, timeout: float = 30.0) -> bool:
        """Whether every worker answers within ``timeout`` (False if one is dead, or busy in a hung step)."""
        try:
            ray.get([w.apply.remote(_rank_of) for w in self.workers], timeout=timeout)
            return True
        except Exception:  # dead, or hung: either way the group must be replaced
            return False

    def inject_nan(self, steps: int = 1) -> None:
        """Fault injection: rank 0's loss is NaN for the next ``steps`` steps (all ranks then skip them)."""
        self._get(self.rank0.inject_nan_next_step.remote(steps), "inject_nan")

    def inject_nan_weights(self) -> None:
        """Fault injection: rank 0's next optimizer step leaves a NaN in its weights."""
        self._get(self.rank0.inject_nan_weights.remote(), "inject_nan_weights")

    def inject_raise(self, after_steps: int) -> None:
        """Fault injection: every rank's next ``train`` raises after ``after_steps`` optimizer steps."""
        self._all("inject_raise", after_steps, what="inject_raise")

    def shutdown(self) -> None:
        """Kill the workers and free the placement group (safe to call twice)."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        self.workers = []
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
            self._pg = None


def _rank_of(worker) -> int:
    return worker.rank

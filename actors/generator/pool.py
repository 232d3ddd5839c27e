"""``GeneratorPool``: ``generator.num_actors`` generator actors behind one ``sample`` call. It splits
a batch evenly, returns results in row order, restarts and re-syncs an actor that dies, and times
out an actor that hangs. Weights reach the actors only through ``actors.weight_sync``: the pool is
its ``SyncTarget`` (``actors/weight_sync/base.py``) and keeps a ``SyncState``, whose last publication
it re-applies to a restarted actor before re-sampling its share.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from actors.generator.actor import ENV_VARS, EngineFailed, GeneratorActor
from actors.generator.sampling import lora_engine_kwargs, split_evenly
from actors.placement import PlacementError, why_unplaced
from actors.waiting import ActorWait, demand_of
from actors.weight_sync.base import EngineGroup, Publication, SyncState
from common.types import SampleGroup

log = logging.getLogger(__name__)


class GeneratorLost(RuntimeError):
    """A generator actor died (Ray restarts it up to ``max_restarts`` times)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class GeneratorHung(GeneratorLost, TimeoutError):
    """A generator actor did not answer within its timeout (it is killed and restarted)."""


@dataclass(eq=False)
class SampleCall:
    """A submitted ``sample`` call; hand it to ``GeneratorPool.collect``."""

    rows: list[dict]
    seed: int
    greedy: bool
    version: int
    shares: dict[int, tuple[int, int]]
    refs: dict[int, Any]
    deadlines: dict[int, float]
    started: float = field(default_factory=time.perf_counter)
    overrides: dict | None = None


class GeneratorPool:
    """``gen_cfg.num_actors`` generator actors behind one ``sample`` call."""

    def __init__(self, model_cfg, gen_cfg, prompt_field: str = "prompt", seed: int = 0, *, max_restarts: int = 3,
                 mode: Literal["sync", "async"] = "sync", weight_transfer: str | None = None,
                 lora_rank: int | None = None):
        import ray

        self.model_cfg, self.gen_cfg, self.mode, self.max_restarts = model_cfg, gen_cfg, mode, max_restarts
        self.version = 0
        self.restarts = 0
        self.sync_state = SyncState()
        """What weight sync keeps here: the last publication every actor loaded (re-applied after a
        restart), this pool's buffer files, the NCCL session."""
        self.last_sample_stats: dict[str, float] = {}
        extra = {"weight_transfer_config": {"backend": "nccl"}} if weight_transfer == "nccl" else {}
        extra.update(lora_engine_kwargs(lora_rank))  # LoRA: each version arrives as an adapter of this rank
        self.demand = demand_of(gen_cfg.num_cpus, gen_cfg.num_gpus, gen_cfg.resources)
        """What each actor asks Ray for (``generator.resources`` pins it to nodes that offer them)."""
        remote_cls = ray.remote(GeneratorActor).options(
            num_cpus=gen_cfg.num_cpus, num_gpus=gen_cfg.num_gpus, resources=dict(gen_cfg.resources),
            max_restarts=max_restarts, max_task_retries=0, runtime_env={"env_vars": dict(ENV_VARS)},
        )
        self.actors = [remote_cls.remote(model_cfg, gen_cfg, i, seed, prompt_field, extra)
                       for i in range(gen_cfg.num_actors)]
        self._served = [0] * gen_cfg.num_actors
        self._info: list[dict] = [{} for _ in self.actors]
        self._submitted: list[SampleCall] = []
        """Calls submitted and not yet collected or abandoned: ``drain`` waits for each of them."""
        try:
            for i in range(len(self.actors)):
                self._info[i] = self._await_ready(i, count_restart=False)
            self.param_spec = self._call([0], "param_spec", timeout=gen_cfg.timeout_s, what="param_spec")[0]
        except BaseException:
            self.shutdown()
            raise

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, rows: list[dict], seed: int, greedy: bool = False,
               overrides: dict | None = None) -> list[SampleGroup]:
        """``n`` completions per row (one, greedy, when ``greedy``), one ``SampleGroup`` per row in order."""
        return self.collect(self.submit(rows, seed, greedy, overrides))

    def submit(self, rows: list[dict], seed: int, greedy: bool = False,
               overrides: dict | None = None) -> SampleCall:
        """Start sampling without waiting (async mode overlaps this with training)."""
        if self.mode == "sync" and len(set(self._served)) > 1:
            raise RuntimeError(f"refusing to sample in sync mode: generators serve a mix of policy versions "
                               f"{self._served} (the last weight sync did not reach every generator)")
        rows = list(rows)
        shares = {i: b for i, b in enumerate(split_evenly(len(rows), len(self.actors))) if b[1] > b[0]}
        pending = SampleCall(rows, seed, greedy, self.version, shares, {}, {}, overrides=overrides)
        self._submitted.append(pending)
        for i in shares:
            self._dispatch(pending, i)
        return pending

    def collect(self, pending: SampleCall) -> list[SampleGroup]:
        """Wait for a submitted call; an actor that died, or whose engine raised, is restarted,
        re-synced and its share re-sampled."""
        results: dict[int, list[SampleGroup]] = {}
        try:
            self._collect_shares(pending, results)
        finally:  # a call that raised with shares still running stays for ``drain``/``abandon``
            if not pending.refs and pending in self._submitted:
                self._submitted.remove(pending)
        groups = [g for i in sorted(results) for g in results[i]]
        versions = {g.policy_version for g in groups}
        if self.mode == "sync" and len(versions) > 1:
            raise RuntimeError(f"refusing a sample from a mix of policy versions {sorted(versions)} in sync mode")
        seconds = time.perf_counter() - pending.started
        # The engines' own time (the slowest share): in async mode the span from submit to collect
        # also covers whatever the driver did meanwhile.
        engine_s = max((g.sample_s for g in groups), default=0.0)
        tokens = sum(len(c.token_ids or ()) for g in groups for c in g.completions)
        self.last_sample_stats = {"sample_s": seconds, "engine_s": engine_s, "tokens": float(tokens),
                                  "tokens_per_s": tokens / max(engine_s or seconds, 1e-9)}
        return groups

    def _collect_shares(self, pending: SampleCall, results: dict[int, list[SampleGroup]]) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        attempts = {i: 0 for i in pending.shares}
        while pending.refs:
            now = time.perf_counter()
            first = min(pending.refs, key=pending.deadlines.get)
            ready, _ = ray.wait(list(pending.refs.values()), num_returns=1,
                                timeout=max(0.0, pending.deadlines[first] - now))
            if not ready:
                raise GeneratorHung(first, f"{self.actor_name(first)} did not answer sample within {self.gen_cfg.timeout_s}s")
            i = next(j for j, ref in pending.refs.items() if ref == ready[0])
            del pending.refs[i]
            old_pid = None
            try:
                groups = ray.get(ready[0])
            except RayActorError as e:
                reason = f"died ({type(e).__name__})"
            except RayTaskError as e:
                if not isinstance(getattr(e, "cause", None), EngineFailed):
                    raise  # bad input (e.g. a row without a prompt): not the engine's fault
                reason = str(e.cause)
                old_pid = self._kill(i)
            else:
                # A share from an actor that restarted (between calls too) serves older weights than
                # the pool had when the call was submitted: in either mode it is re-synced and redone.
                stale = any(g.policy_version != pending.version for g in groups)
                if not stale:
                    results[i] = groups
                    continue
                reason = f"served version {groups[0].policy_version}, not {pending.version} (restarted?)"
                if self.sync_state.publication is None:
                    raise RuntimeError(f"refusing to sample in sync mode: {self.actor_name(i)} {reason}, and no "
                                       "weights were published to re-sync it from")
            attempts[i] += 1
            if attempts[i] > self.max_restarts:
                raise RuntimeError(f"{self.actor_name(i)} failed {attempts[i]} times during sample; last: {reason}")
            log.warning("%s %s; restarting, re-syncing and re-sampling its share", self.actor_name(i), reason)
            self._recover(i, old_pid=old_pid)
            self._dispatch(pending, i)

    def _dispatch(self, pending: SampleCall, i: int) -> None:
        start, end = pending.shares[i]
        pending.refs[i] = self.actors[i].sample.remote(pending.rows[start:end], pending.seed, pending.greedy, start,
                                                       pending.overrides)
        pending.deadlines[i] = time.perf_counter() + self.gen_cfg.timeout_s

    def drain(self) -> int:
        """Wait until no actor is inside a submitted ``sample`` call (results stay for ``collect``);
        past a call's deadline its actor counts as hung. Returns how many calls were waited for."""
        import ray

        calls = [(i, ref, p.deadlines[i]) for p in list(self._submitted) for i, ref in p.refs.items()]
        for i, ref, deadline in sorted(calls, key=lambda c: c[2]):
            ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                raise GeneratorHung(i, f"{self.actor_name(i)} did not finish sample within {self.gen_cfg.timeout_s}s")
        return len(calls)

    # -- versions and weights ------------------------------------------------------------------

    def versions(self) -> list[int]:
        """The policy version each actor serves (asked live)."""
        return self._call(range(len(self.actors)), "get_version", timeout=self.gen_cfg.timeout_s, what="get_version")

    def served_versions(self) -> list[int]:
        """The policy version each actor was last loaded with (as its load or its restart reported;
        no call to the actors, so it answers while they sample)."""
        return list(self._served)

    def load_publication(self, publication: Publication) -> float:
        """Make every actor serve ``publication`` (an actor that dies meanwhile is recovered and
        loaded again); then it becomes the pool's current weights. Returns the load seconds."""
        everyone = list(range(len(self.actors)))
        for attempt in range(self.max_restarts + 1):
            try:
                seconds = publication.apply(self, everyone)
                break
            except GeneratorLost as e:
                if attempt == self.max_restarts:
                    raise
                if isinstance(e, GeneratorHung):  # a hung engine must not stall the round: replace it
                    log.warning("%s; restarting it before loading again", e)
                    self.restart_actor(e.index, resync=False)
                else:
                    log.warning("%s; waiting for its restart before loading again", e)
                    self._recover(e.index, resync=False)
        self.sync_state.publication, self.version = publication, publication.version
        self._served = [publication.version] * len(self.actors)
        return seconds

    def restart_actor(self, i: int, resync: bool = True) -> None:
        """Kill actor ``i`` (Ray restarts it), wait for its engine and re-sync it: for a hung actor."""
        self.restart_actors([i], resync=resync)

    def restart_actors(self, indices: list[int], resync: bool = True) -> None:
        """Kill the given actors at once (Ray restarts them side by side), then wait for each
        engine and re-sync it: restarting N costs about one engine start, not N."""
        old_pids = {i: self._kill(i) for i in indices}
        for i in indices:
            self._recover(i, resync=resync, old_pid=old_pids[i])

    def abandon(self, call: SampleCall) -> int:
        """Give up a submitted call whose results are no longer wanted (its round is redone): wait
        for its shares still running, each until its deadline, so that no engine is busy with it
        when the next call is submitted; an actor past its deadline is restarted. Returns the
        shares waited for."""
        import ray

        if call in self._submitted:
            self._submitted.remove(call)
        waited = 0
        for i, ref in sorted(call.refs.items(), key=lambda item: call.deadlines[item[0]]):
            ready, _ = ray.wait([ref], timeout=max(0.0, call.deadlines[i] - time.perf_counter()))
            waited += 1
            if not ready:
                log.warning("%s is still inside an abandoned sample call past its deadline; restarting it",
                            self.actor_name(i))
                self.restart_actor(i)
        call.refs.clear()
        return waited

    def _kill(self, i: int) -> int | None:
        """End actor ``i``'s process (Ray restarts it); returns the old pid, for ``_recover``."""
        import ray

        ray.kill(self.actors[i], no_restart=False)
        return self._info[i].get("pid")

    def _recover(self, i: int, resync: bool = True, old_pid: int | None = None) -> None:
        info = self._await_ready(i, count_restart=True, old_pid=old_pid)
        self._served[i] = info["version"]
        current = self.sync_state.publication
        if resync and current is not None and info["version"] != current.version:
            current.apply(self, [i])
            self._served[i] = current.version

    def _await_ready(self, i: int, count_restart: bool, old_pid: int | None = None) -> dict:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

        timeout = self.gen_cfg.start_timeout_s
        deadline = time.perf_counter() + timeout
        waiting = ActorWait([(self.actor_name(i), self.actors[i])], self.demand, f"generator.start_timeout_s={timeout:g}")
        while True:
            try:
                info = waiting.get(self.actors[i].ready.remote(), timeout=max(0.0, deadline - time.perf_counter()))
                if old_pid is None or info["pid"] != old_pid:
                    break
                # A kill is asynchronous: the old process may still answer once.
                time.sleep(0.2)
            except ActorUnavailableError:  # restarting (its node may be gone): wait for it
                if time.perf_counter() > deadline:
                    self._raise_not_started(i, "did not come back")
                waiting.tick()
                time.sleep(0.5)
            except ActorDiedError as e:
                raise RuntimeError(f"{self.actor_name(i)} is dead for good (max_restarts={self.max_restarts} "
                                   f"used up, or its engine fails to start): {e}") from None
            except GetTimeoutError:
                self._raise_not_started(i, "engine did not start")
        if count_restart and info["pid"] != self._info[i].get("pid"):
            self.restarts += 1
        self._info[i] = info
        return info

    def _raise_not_started(self, i: int, what: str):
        """After ``start_timeout_s``: a ``PlacementError`` naming the missing resources when no
        alive node can hold the actor (its node was lost), else a plain timeout."""
        limit = f"generator.start_timeout_s={self.gen_cfg.start_timeout_s:g}s"
        why = why_unplaced(self.demand)
        if why:
            raise PlacementError(f"{self.actor_name(i)} {what} within {limit}: {why}") from None
        raise TimeoutError(f"{self.actor_name(i)}: {what} within {limit}") from None

    def _call(self, indices, method: str, *args, timeout: float, what: str) -> list:
        """``method(*args)`` on the given actors, each answer within ``timeout`` seconds overall."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        indices = list(indices)
        refs = [getattr(self.actors[i], method).remote(*args) for i in indices]
        deadline, out = time.perf_counter() + timeout, []
        for i, ref in zip(indices, refs):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.perf_counter())))
            except GetTimeoutError:
                raise GeneratorHung(i, f"{self.actor_name(i)} did not answer {what} within {timeout}s") from None
            except RayActorError as e:
                raise GeneratorLost(i, f"{self.actor_name(i)} died during {what} ({type(e).__name__})") from e
        return out

    def node_ids(self) -> list[str | None]:
        """The node each actor runs on, asked live: an actor that Ray restarted since the pool last
        heard from it (elsewhere, if its node was lost) is noticed and counted here, so a weight
        sync picks its path from where the actors are now. An actor that is down is waited for."""
        for _ in range(self.max_restarts + 1):
            try:
                infos = self._call(range(len(self.actors)), "ready", timeout=self.gen_cfg.timeout_s, what="ready")
                break
            except GeneratorLost as e:
                self._recover(e.index, resync=False)
        else:
            raise RuntimeError(f"generators kept failing while asked where they run (max_restarts={self.max_restarts})")
        for i, info in enumerate(infos):
            if info["pid"] != self._info[i].get("pid"):
                self.restarts += 1
                self._served[i] = info["version"]
            self._info[i] = info
        return [info.get("node_id") for info in self._info]

    def load_weights(self, indices: list[int], desc: dict, version: int, timeout: float) -> list[float]:
        """Load a stored publication (``weight_sync`` descriptor) into actors ``indices``, each
        within ``timeout`` seconds overall; returns each one's load seconds."""
        return self._call(indices, "load_weights", desc, version, timeout=timeout,
                          what=f"loading weights version {version}")

    def engines(self) -> EngineGroup:
        """Every actor's engine, for the NCCL weight-transfer steps, with who serves now."""
        identity = tuple((a._actor_id.hex(), pid) for a, pid in zip(self.actors, self.pids()))
        return EngineGroup(list(self.actors), self.gen_cfg.tensor_parallel_size, identity)

    def pids(self) -> list[int | None]:
        return [info.get("pid") for info in self._info]

    def actor_name(self, i: int) -> str:
        return f"generator {i} (actor id {self.actors[i]._actor_id.hex()})"

    def shutdown(self) -> None:
        """Remove this pool's sync files (through an actor on their node) and end the actors."""
        import ray

        files = sorted(self.sync_state.files)
        if files and self.actors:
            try:
                ray.get(self.actors[0].remove_sync_files.remote(files), timeout=30)
            except Exception as e:  # cleanup must not hide the reason we are shutting down
                log.warning("could not remove sync files %s: %s", files, e)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def make_generate_fn(pool: GeneratorPool, prompt_field: str, seed: int):
    """``generate(prompts, n, temperature, max_tokens) -> list[list[str]]`` on the policy's own
    generators: what a self-rewarding judge (``judges.llm:LLMJudge(self_rewarding=True)``) samples
    its verdicts with. The policy's chat template applies as for training prompts."""
    calls = iter(range(1, 2**62))

    def generate(prompts: list[str], n: int, temperature: float, max_tokens: int) -> list[list[str]]:
        rows = [{prompt_field: p} for p in prompts]
        greedy = temperature == 0
        overrides = {"max_new_tokens": max_tokens, **({} if greedy else {"n": n, "temperature": temperature})}
        groups = pool.sample(rows, seed=seed * 7_919 + next(calls), greedy=greedy, overrides=overrides)
        return [[c.text for c in g.completions] for g in groups]

    return generate

"""``JudgePool``: a pool of judge actors (``actors.judging.host``) that scores a round.

``JudgePool(judge_cfg)`` checks the judge's path and kwargs (before any actor starts), then starts
``judge_cfg.num_actors`` actors with the configured CPUs/GPUs; each builds the judge and calls its
``setup()``. ``pool.score(items)`` splits the items into one contiguous chunk per actor, scores
the chunks concurrently and returns a ``ScoreResult``: validated scores (NaN, inf and
non-numbers become ``None``), the ``missing_eos_penalty`` subtracted from completions cut by the
length limit, and the completions lost counted by kind (``raised``, ``wrong_shape``, ``none``,
``not_a_number``, ``nan``, ``inf``, ``timeout``, ``actor_died``, and ``judge.<kind>`` counts the
judge reports itself). Inside an actor, ``judges.calling.score_guarded`` retries a failing batch
per item and per completion, so only the failing completions are lost.

A call that exceeds ``timeout_s`` loses its chunk (counted ``timeout``) and its actor is replaced
(a fresh process: a hung judge is gone for sure). An actor that dies is replaced and its chunk
re-sent once. Each actor slot may be replaced ``max_restarts`` times; past that the pool raises
``JudgePoolError`` naming the judge class. Judge misbehaviour never raises.

Self-rewarding judges (``runs_in_driver(kwargs)`` true, e.g. ``LLMJudge(self_rewarding=True)``)
need the policy's generators, which the driver holds: such a judge is hosted in the driver
itself, handed ``generate_fn`` (``fn(prompts, n, temperature, max_tokens) -> list[list[str]]``)
through its ``bind_generate``, and called on a worker thread bounded by ``timeout_s``. The judge
reaches the generators only through a ``GenerateGate``: its calls are serialized and refused past
the call's deadline. A timed-out call loses its completions; its thread cannot be killed, so its
gate is closed for good (after waiting for a pool call already under way, which the pool's own
timeouts bound) and a fresh judge instance with a fresh gate takes its place: the abandoned
thread can never touch the (not thread-safe) generator pool again. The orchestrator can always
pass ``generate_fn``: judges that do not ask for it never see it.

A corrector (``corrector`` section, for correction pairs; see ``judges.correction``) is hosted in
the same actors: ``JudgePool(judge_cfg, corrector=(cls, kwargs))`` builds it next to the judge in
each actor, and ``pool.score(items, correct=True)`` returns its texts with the scores, in the same
call per chunk (``judges.calling.correct_guarded`` inside the actor): pair making needs no actor.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.judging.host import GenerateGate, JudgeHost
from actors.placement import PlacementError, why_unplaced
from actors.waiting import ActorWait, demand_of
from judges.base import JudgeItem
from judges.loader import check_judge_spec

log = logging.getLogger("odpo.judges")


@dataclass
class ScoreResult:
    scores: list[list[float | None]]
    """One list per item, one score per completion; None = no score (see ``failures``)."""
    failures: dict[str, int] = field(default_factory=dict)
    """Completions that got no score, by kind (plus ``judge.<kind>`` counts reported by the judge)."""
    judge_s: float = 0.0
    """Wall time of the call."""
    errors: list[str] = field(default_factory=list)
    """Distinct one-line messages (each names the judge or corrector class), for the log."""
    restarts: int = 0
    """Actors replaced during this call."""
    corrections: list[list[str | None]] | None = None
    """With ``correct``: one list per item, the corrector's improved text (or None) per completion."""
    corrector_failures: dict[str, int] = field(default_factory=dict)
    """With ``correct``: completions left uncorrected by a failure, by kind."""


_CHUNK_LOSSES = ("timeout", "actor_died")
"""Failure kinds that lose a chunk's whole call: its corrections as well as its scores."""


class JudgePoolError(RuntimeError):
    """The pool cannot go on: an actor failed to start, or restarts are exhausted."""


def split_evenly(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` contiguous ranges whose sizes differ by at most one."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        stop = start + size + (p < extra)
        out.append(range(start, stop))
        start = stop
    return out


class JudgePool:
    def __init__(self, judge_cfg: Any, seed: int = 0, max_restarts: int = 3,
                 generate_fn: Callable | None = None, corrector: tuple[str, dict] | None = None):
        """``judge_cfg``: the ``judge`` config section (cls, kwargs, num_actors, num_cpus, num_gpus,
        timeout_s, setup_timeout_s, missing_eos_penalty). ``generate_fn``: the policy's sampler for
        self-rewarding judges (ignored by others). ``corrector``: ``(cls, kwargs)`` of a corrector
        to host next to the judge (for ``correct``)."""
        self.cfg, self.seed, self.max_restarts = judge_cfg, seed, max_restarts
        cls = check_judge_spec(judge_cfg.cls, judge_cfg.kwargs)  # raises JudgeSpecError, before any actor
        self.corrector = (corrector[0], dict(corrector[1])) if corrector else None
        if self.corrector:
            check_judge_spec(*self.corrector, "corrector.cls", ("correct",))
        self.name = cls.__name__  # every error message carries it
        self.restarts = 0
        self.progress = (0, 0)
        """(items done, items) of the current or last ``score``/``correct`` call, for progress reports."""
        self._actors: list[Any] = []
        self._slot_restarts: list[int] = []
        self._local: JudgeHost | None = None
        self._gate: GenerateGate | None = None
        self._generate_fn = generate_fn
        in_driver = getattr(cls, "runs_in_driver", None)
        if callable(in_driver) and in_driver(dict(judge_cfg.kwargs)):
            if generate_fn is None:
                raise JudgePoolError(f"judge {self.cfg.cls} ({self.name}): its kwargs ask for the policy's generators "
                                     "(self-rewarding) but JudgePool got no generate_fn")
            self._start_local()
            return
        import ray

        self._ray = ray
        self._remote = ray.remote(JudgeHost)
        self._actors = [self._start(slot) for slot in range(judge_cfg.num_actors)]
        self._slot_restarts = [0] * judge_cfg.num_actors
        waiting = ActorWait([(f"judge actor {slot}", a) for slot, a in enumerate(self._actors)], self._demand(),
                            f"judge.setup_timeout_s={self._setup_timeout():g}")
        try:
            waiting.get([a.ready.remote() for a in self._actors], timeout=self._setup_timeout())
        except Exception as e:
            self.shutdown(close=False)  # a close() would queue behind constructors that may never run
            why = why_unplaced(self._demand()) if isinstance(e, ray.exceptions.GetTimeoutError) else None
            raise (PlacementError if why else JudgePoolError)(
                f"judge {self.cfg.cls} ({self.name}): actor failed to start: {why or _describe(e)}") from None

    def _start_local(self) -> None:
        """(Re)build the in-driver judge with a fresh gate to the generators."""
        self._gate = GenerateGate(self._generate_fn)
        try:
            self._local = JudgeHost(self.cfg.cls, dict(self.cfg.kwargs), self.seed, self._gate, self.corrector)
        except Exception as e:
            raise JudgePoolError(f"judge {self.cfg.cls} ({self.name}): failed to start: {_describe(e)}") from None

    @property
    def runs_in_driver(self) -> bool:
        return self._local is not None

    def _setup_timeout(self) -> float:
        return float(getattr(self.cfg, "setup_timeout_s", 900))

    def _demand(self) -> dict[str, float]:
        return demand_of(self.cfg.num_cpus, self.cfg.num_gpus, self.cfg.resources)

    def _start(self, slot: int):
        return self._remote.options(
            num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus, resources=dict(self.cfg.resources),
            max_restarts=0, max_task_retries=0,
        ).remote(self.cfg.cls, dict(self.cfg.kwargs), self.seed + slot, None, self.corrector)

    def _replace(self, slot: int, why: str) -> None:
        """Kill the actor in ``slot`` and start a fresh one (its construction is awaited lazily:
        calls queue behind it, and a failed construction surfaces as a dead actor)."""
        if self._slot_restarts[slot] >= self.max_restarts:
            unplaced = why_unplaced(self._demand())  # e.g. its node was lost and no other offers its resources
            raise (PlacementError if unplaced else JudgePoolError)(
                f"judge {self.cfg.cls} ({self.name}): actor {slot} {why}; restarts exhausted ({self.max_restarts})"
                + (f"; {unplaced}" if unplaced else ""))
        self._slot_restarts[slot] += 1
        self.restarts += 1
        log.warning("judge %s: actor %d %s; restarting (%d/%d)", self.cfg.cls, slot, why,
                    self._slot_restarts[slot], self.max_restarts)
        try:
            self._ray.kill(self._actors[slot], no_restart=True)
        except Exception:  # already gone
            pass
        self._actors[slot] = self._start(slot)

    def _dispatch(self, method: str, items: list[JudgeItem], *args) -> tuple[list[list[Any]], Counter, list[str]]:
        """``method(items, *args)`` for every completion of ``items``, in the driver or on the
        actors: one entry per completion (None where lost), losses by kind, messages."""
        out: list[list[Any]] = [[None] * len(item.completions) for item in items]
        failures: Counter = Counter()
        errors: list[str] = []
        self.progress = (0, len(items))
        if items:
            call = self._call_in_driver if self._local is not None else self._call_on_actors
            call(method, items, args, out, failures, errors)
        self.progress = (len(items), len(items))
        return out, failures, errors

    def score(self, items: list[JudgeItem], correct: bool = False) -> ScoreResult:
        """Score every completion of ``items`` (and, with ``correct``, have the hosted corrector
        propose a text for each, in the same call); never raises for judge or corrector misbehaviour."""
        if correct and self.corrector is None:
            raise JudgePoolError(f"judge {self.cfg.cls}: no corrector hosted (corrector.cls is not set)")
        t0 = time.perf_counter()
        restarts0 = self.restarts
        rows, failures, errors = self._dispatch("score", items, correct)
        scores = [[cell[0] if cell is not None else None for cell in row] for row in rows]
        penalty = self.cfg.missing_eos_penalty
        if penalty:
            for item, row in zip(items, scores):
                for j, c in enumerate(item.completions):
                    if row[j] is not None and c.finish_reason == "length":
                        row[j] -= penalty
        for message in errors:
            log.warning("judge %s: %s", self.cfg.cls, message)
        judged = {k: v for k, v in failures.items() if v and not k.startswith("corrector.")}
        result = ScoreResult(scores=scores, failures=judged, judge_s=time.perf_counter() - t0, errors=errors,
                             restarts=self.restarts - restarts0)
        if correct:
            result.corrections = [[cell[1] if cell is not None else None for cell in row] for row in rows]
            # A chunk lost whole (timeout, a dead actor) lost its corrections with its scores.
            result.corrector_failures = {k.removeprefix("corrector."): v for k, v in failures.items()
                                         if v and (k.startswith("corrector.") or k in _CHUNK_LOSSES)}
        return result

    @staticmethod
    def _merge(chunk: range, out: tuple, scores: list, failures: Counter, errors: list[str]) -> None:
        chunk_scores, chunk_failures, chunk_errors = out
        for i, row in zip(chunk, chunk_scores):
            scores[i] = list(row)
        failures.update(chunk_failures)
        errors.extend(e for e in chunk_errors if e not in errors)

    def _call_in_driver(self, method: str, items, args, scores, failures, errors) -> None:
        """``method`` on the in-driver host, filling ``scores``."""
        executor = ThreadPoolExecutor(max_workers=1)
        self._gate.deadline = time.monotonic() + self.cfg.timeout_s
        future = executor.submit(getattr(self._local, method), items, *args)
        try:
            self._merge(range(len(items)), future.result(timeout=self.cfg.timeout_s), scores, failures, errors)
        except FutureTimeout:
            failures["timeout"] += sum(len(item.completions) for item in items)
            errors.append(f"{self.name}: call timed out after {self.cfg.timeout_s} s")
            self._gate.close()  # the abandoned thread cannot reach the generators from here on
            self._replace_local("timed out")
        except Exception as e:  # score_guarded does not raise; a broken hook might
            failures["raised"] += sum(len(item.completions) for item in items)
            errors.append(f"{self.name}: {_describe(e)}")
        finally:
            executor.shutdown(wait=False)

    def _replace_local(self, why: str) -> None:
        if self.restarts >= self.max_restarts:
            raise JudgePoolError(f"judge {self.cfg.cls} ({self.name}): in-driver judge {why}; "
                                 f"restarts exhausted ({self.max_restarts})")
        self.restarts += 1
        log.warning("judge %s: in-driver judge %s; replacing it (%d/%d)", self.cfg.cls, why, self.restarts,
                    self.max_restarts)
        self._start_local()

    def _call_on_actors(self, method: str, items, args, scores, failures, errors) -> None:
        """``method`` on the actors, one chunk each, filling ``scores``."""
        ray = self._ray
        chunks = [c for c in split_evenly(len(items), len(self._actors)) if len(c)]
        pending: dict[Any, tuple[int, range, float, int]] = {}  # ref -> (slot, chunk, deadline, attempt)

        def submit(slot: int, chunk: range, attempt: int, extra_s: float = 0.0) -> None:
            ref = getattr(self._actors[slot], method).remote([items[i] for i in chunk], *args)
            pending[ref] = (slot, chunk, time.monotonic() + self.cfg.timeout_s + extra_s, attempt)

        def lose(chunk: range, kind: str) -> None:
            failures[kind] += sum(len(items[i].completions) for i in chunk)

        for slot, chunk in enumerate(chunks):
            submit(slot, chunk, 0)
        while pending:
            wait_s = max(0.0, min(d for _, _, d, _ in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            for ref in ready:
                slot, chunk, _, attempt = pending.pop(ref)
                try:
                    self._merge(chunk, ray.get(ref), scores, failures, errors)
                    self.progress = (self.progress[0] + len(chunk), len(items))
                except ray.exceptions.RayActorError as e:
                    errors.append(f"{self.name}: actor {slot} died: {_describe(e)}")
                    self._replace(slot, "died")
                    if attempt == 0:  # re-send once; a chunk that kills its actor twice is lost
                        submit(slot, chunk, 1, extra_s=self._setup_timeout())
                    else:
                        lose(chunk, "actor_died")
                except Exception as e:  # the host itself failed (e.g. unpicklable scores)
                    errors.append(f"{self.name}: {_describe(e)}")
                    lose(chunk, "raised")
            now = time.monotonic()
            for ref, (slot, chunk, deadline, _) in list(pending.items()):
                if deadline <= now and not ray.wait([ref], timeout=0)[0]:
                    pending.pop(ref)
                    lose(chunk, "timeout")
                    errors.append(f"{self.name}: actor {slot}: call timed out after {self.cfg.timeout_s} s")
                    self._replace(slot, "timed out")

    @property
    def actors(self) -> list[Any]:
        """The live judge actor handles (none when the judge runs in the driver)."""
        return list(self._actors)

    def shutdown(self, close: bool = True) -> None:
        """Close the judges (best effort, bounded; ``close=False`` skips it) and end the actors."""
        if self._local is not None:
            self._local.close()
            return
        if not self._actors:
            return
        try:
            if close:
                self._ray.get([a.close.remote() for a in self._actors], timeout=30)
        except Exception:  # a dead or hung actor is killed below anyway
            pass
        for actor in self._actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self._actors = []


def _describe(e: BaseException) -> str:
    """One line for an exception, preferring the judge's own error inside Ray's wrappers."""
    cause = getattr(e, "cause", None) or e.__cause__
    if cause is not None and cause is not e:
        return _describe(cause)
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
    return f"{type(e).__name__}: {tail[:160]}"

"""Recovery: a failed round is redone from the state it started from.

Samples already collected are kept (else the prompt cursor is rewound and in-flight sampling
dropped), a hung generator is replaced, a learner that died, hung or had started the round's
steps is restored (the newest good checkpoint, then the saved pairs of the rounds after it), and
the policy version goes back to the one those weights carry: versions move only when weights
change. A round that keeps failing stops the run after ``loop.max_round_retries`` retries, with
the rounds completed since the last checkpoint saved on the way out.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from actors.generator.pool import GeneratorHung
from actors.learner.precision import NonFiniteWeights
from actors.placement import PlacementError
from orchestrator.loop.beta import beta_for_round
from orchestrator.loop.data import PromptSampler
from orchestrator.loop.state import LoopState
from orchestrator.rundir import checkpoint_problem, pairs_from_records
from orchestrator.service.guards import LoopHalt

Loop = Any  # orchestrator.loop.loop.Loop (it imports this module: named here for the annotations only)

log = logging.getLogger("odpo.loop")


def run_with_retries(loop: Loop, r: int) -> dict | None:
    """Run round ``r``; a failure is recovered from and the round redone, up to
    ``loop.max_round_retries`` times, then the run stops with the round's last error."""
    failures = 0
    while True:
        try:
            return loop.run_round(r)
        except (PlacementError, LoopHalt):  # no node can hold a part; a full disk: a retry would not help
            raise
        except Exception as e:  # any failure of a part: the round is redone after recovery
            failures += 1
            if isinstance(e, NonFiniteWeights):  # (a Ray task error is also an instance of its cause)
                loop.nonfinite_updates += 1
            if failures > loop.c.loop.max_round_retries:
                raise RuntimeError(f"round {r} failed {failures} times (loop.max_round_retries="
                                   f"{loop.c.loop.max_round_retries}); last error: {type(e).__name__}: {e}") from e
            log.warning("round %d failed (%s: %s); recovering and redoing it (%d/%d)", r, type(e).__name__, e,
                        failures, loop.c.loop.max_round_retries)
            recover(loop, r, e)


def recover(loop: Loop, r: int, error: Exception) -> None:
    """Make round ``r`` safe to run again from the state it started from: keep its samples if
    they were collected (else rewind the prompt cursor and drop in-flight sampling), replace a
    hung generator, bring back a learner that died, hung or had started the round's steps, and
    give the generators back the round-start weights if a push of the failed attempt's weights
    began."""
    loop.round_retries += 1
    if any(m.get("round", 0) > loop.state.round for m in loop.rd.read_metrics()[-1:]):
        loop.rd.truncate_metrics(loop.state.round)  # the failed attempt's line (a later write failed)
    n, seed = len(loop.prompts), loop.c.run.seed
    in_flight = [d for d in (loop.pending, loop.adopted) if d is not None and d.call is not None]
    loop.adopted = None
    if loop.in_hand is not None and loop.in_hand.round == r:
        # Async mode had submitted round r+1's sampling: the redo takes it over (same prompts,
        # seed and weights) instead of leaving it running unowned and sampling it again.
        if loop.pending is not None and loop.pending.round == r + 1:
            loop.adopted = loop.pending
        loop.pending = loop.in_hand  # the same prompts, sampled with the same weights
        loop.sampler = PromptSampler.from_state(loop.pending.sampler_after, n, seed)
    else:
        loop.pending = None
        loop.sampler = PromptSampler.from_state(loop.state.sampler, n, seed) if loop.state.sampler \
            else PromptSampler(n, seed)
    loop.in_hand = None
    if isinstance(error, GeneratorHung):
        loop.parts.generators.restart_actor(error.index)
    for drawn in in_flight:  # a call the redo does not take over is waited out, never left running
        if drawn is not loop.adopted:
            loop.parts.generators.abandon(drawn.call)
            drawn.call = None
    alive = loop.parts.learner.alive()
    if not alive or loop.learn_started:
        restore_learner(loop, rebuild=not alive)
    loop.learner_version = loop.committed_version
    if loop.pushing or loop.state.policy_version > loop.committed_version:
        log.warning("re-syncing the generators to the round-start weights (version %d)", loop.committed_version)
        loop.pushing = True
        loop.parts.sync(loop.committed_version)
        loop.pushing = False
        loop.republish = False  # that was the rebuilt learner's publication
        loop.state.policy_version = loop.committed_version


def rewind_to_last_round(loop: Loop) -> None:
    """Before a checkpoint of the last completed round on the way out: the failed attempt's
    version is dropped, and only its already collected async samples stay pending (what that
    checkpoint would have held); sampling still in flight is not waited for."""
    loop.learner_version = loop.committed_version
    held = loop.in_hand
    keep = loop.c.loop.mode == "async" and held is not None and held.groups is not None \
        and held.round == loop.state.round + 1
    loop.pending, loop.in_hand = (held if keep else None), None


def restore_learner(loop: Loop, rebuild: bool) -> None:
    """Bring the learner to the end of the last completed round: the newest good checkpoint, then
    the saved pairs of every round after it, trained again in order."""
    # A checkpoint of the failed attempt's round (its later outputs failed) is not a start point.
    path, passed_over = loop.rd.latest_good_checkpoint(checkpoint_problem, max_round=loop.state.round)
    for reason in passed_over:
        log.warning("skipping checkpoint %s", reason)
    loop.restores += 1
    if rebuild or path is None:  # without a checkpoint, only a fresh learner has the initial weights
        loop.learner_restarts += 1
        if loop.learner_restarts > loop.c.loop.max_actor_restarts:
            raise RuntimeError(f"the learner was rebuilt {loop.learner_restarts - 1} times "
                               f"(loop.max_actor_restarts={loop.c.loop.max_actor_restarts}); giving up")
        log.warning("rebuilding the learner group")
        try:
            loop.parts.learner.shutdown()
        except Exception as e:  # its workers may be gone already
            log.warning("shutting down the old learner group: %s", e)
        loop.parts.learner = loop.parts.make_learner()
        # The rebuilt learner publishes its weights (the same version: the round-start weights) at
        # the start of the retried round, so that a generator restarted later re-syncs from the
        # new group's publication, and an NCCL session is re-opened with the new group.
        loop.republish = True
    start = 0
    if path is not None:
        loop.parts.learner.load(str(path))
        start = loop.rd.read_checkpoint_state(path)["round"]
    used_beta = {m.get("round"): m.get("beta") for m in loop.rd.read_metrics()}
    for j in range(start + 1, loop.state.round + 1):
        pairs = pairs_from_records(loop.rd.read_pairs(j))
        if pairs:
            beta = used_beta.get(j) or beta_for_round(loop.c.learner.beta, j, None)
            loop.parts.learner.train(pairs, round=j, beta=beta)
    log.info("learner restored: %s, then the pairs of rounds %d..%d replayed",
             path.name if path else "initial weights", start + 1, loop.state.round)


def checkpoint_before_failing(loop: Loop, save_checkpoint: Callable[[LoopState], None]) -> None:
    """The run is stopping on an error: keep the rounds completed since the last checkpoint. A
    learner that already stepped in the failed round is first brought back to the last completed
    one; a learner that is gone is not rebuilt for this. Best effort: a failure here is logged,
    and the run's own error is what gets raised."""
    try:
        if not loop.parts.learner.alive():
            log.warning("the learner is gone: no checkpoint of round %d before stopping", loop.state.round)
            return
        loop.metrics.set_phase("checkpoint", loop.state.round)
        if loop.learn_started:
            restore_learner(loop, rebuild=False)
        rewind_to_last_round(loop)
        save_checkpoint(loop.state)
    except Exception as e:
        log.warning("could not checkpoint round %d before stopping: %s: %s", loop.state.round, type(e).__name__, e)

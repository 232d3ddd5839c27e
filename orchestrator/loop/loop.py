"""The self-improvement loop, top to bottom.

One round: draw prompts -> generators sample n answers each -> judges score them -> pairs are
selected -> the learner takes DPO steps -> the new weights go to the generators -> the round's
pairs, metrics line and (every k rounds) a checkpoint are written.

``sync`` mode is strictly on-policy. ``async`` mode starts sampling round t+1 (with the weights
of round t-1's training) before judging and training on round t, so generation overlaps judging
and learning; pairs more than ``loop.max_policy_lag`` versions behind the learner are dropped.

A failed round is redone from the state it started from: samples already collected are kept,
a learner that started the round's steps is restored (newest checkpoint, then the saved pairs
of the rounds after it), and the policy version goes back to the one those weights carry:
versions move only when weights change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from actors.generator.pool import GeneratorHung
from actors.learner.precision import NonFiniteWeights
from actors.placement import PlacementError
from orchestrator.loop.beta import beta_for_round, carry_beta
from orchestrator.loop.data import PromptSampler, PromptSet
from orchestrator.loop.faults import FaultInjector
from orchestrator.loop.regenerate import SampleBank
from orchestrator.observe.metrics import Metrics
from orchestrator.observe.procs import ProcessMemory, actor_handles
from orchestrator.pairs.make import PairMaker, pair_figures
from orchestrator.rundir import RunDir, checkpoint_problem, pair_records, pairs_from_records

log = logging.getLogger("odpo.loop")


@dataclass
class Parts:
    """The running actors the loop drives (built by ``orchestrator.cli.run``)."""

    generators: object  # actors.generator.pool.GeneratorPool
    judges: object  # actors.judging.pool.JudgePool
    learner: object  # actors.learner.LearnerGroup
    make_learner: Callable[[], object]  # builds a fresh LearnerGroup (after a worker died)
    sync_cfg: object  # the config's sync section
    run_dir: str
    eval_judges: object | None = None

    def sync(self, version: int) -> dict:
        """Make every generator serve the learner's current weights as ``version``."""
        from actors.weight_sync import sync_weights

        return sync_weights(self.learner, self.generators, version, self.sync_cfg, run_dir=self.run_dir)


@dataclass
class LoopState:
    """What a checkpoint must carry to resume exactly (async mode adds the next round's samples:
    ``orchestrator.loop.carried``)."""

    round: int = 0
    policy_version: int = 0
    sampler: dict = field(default_factory=dict)
    pairs_total: int = 0
    rounds_without_pairs: int = 0
    beta: float | None = None
    """The adaptive β schedule's value for the next round (None for a fixed β or a fixed schedule)."""
    length_counts: dict = field(default_factory=dict)
    """The length guard's running counts of pairs with a longer / shorter chosen side."""


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


@dataclass
class Pending:
    """A round whose prompts are drawn and whose sampling is submitted (or done)."""

    round: int
    indices: list[int]
    """Positions of its prompts in the training set."""
    sampler_after: dict
    """The prompt cursor once these prompts were drawn."""
    handle: object = None
    """The generator pool's ``PendingSample`` while sampling runs."""
    groups: list | None = None
    """The samples, once collected."""


def round_seed(seed: int, round_: int) -> int:
    return (seed * 1_000_003 + round_ * 7_919) % (2**31 - 1)


class Loop:
    def __init__(self, config, rundir: RunDir, parts: Parts, prompts: PromptSet,
                 eval_prompts: PromptSet | None, metrics: Metrics, stop: threading.Event,
                 state: LoopState):
        self.c, self.rd, self.parts, self.metrics, self.stop = config, rundir, parts, metrics, stop
        self.prompts, self.eval_prompts, self.state = prompts, eval_prompts, state
        self.sampler = (PromptSampler.from_state(state.sampler, len(prompts), config.run.seed)
                        if state.sampler else PromptSampler(len(prompts), config.run.seed))
        self.learner_version = state.policy_version  # weights the learner holds
        self.committed_version = state.policy_version  # the learner's version when the last round completed
        self.pending: Pending | None = None  # the next round's sampling (async mode; or kept for a redo)
        self.in_hand: Pending | None = None  # this round's collected samples, kept should it be redone
        self.memory = ProcessMemory()
        self.faults = FaultInjector(config.faults)
        self.pair_maker = PairMaker(config.pairs, config.model)
        self.learner_restarts = 0
        self.round_retries = 0
        self.nonfinite_updates = 0  # rounds redone because a step made the weights inf/NaN
        self.learn_started = False  # the learner may have stepped in this attempt of the round
        self.pushing = False  # a weight push is (or was, when it failed) under way
        # loop.regenerate_every > 1: offline / iterative DPO (orchestrator/loop/regenerate.py)
        self.bank = SampleBank(rundir.root, config.loop.regenerate_every) \
            if config.loop.regenerate_every > 1 else None
        self.republish = False  # a rebuilt learner publishes its weights before anything samples
        self.trackers = None  # orchestrator.observe.trackers.Trackers when report.to names any (set by run.py)
        self.sync_path: str | None = None  # how this round's weight sync travelled (weight_sync's ``path``)

    # --- one round's phases ----------------------------------------------------------------------
    def submit(self, round_: int) -> Pending:
        """Draw round ``round_``'s prompts and start sampling them."""
        indices = self.sampler.draw(self.c.loop.prompts_per_round)
        rows = [self.prompts.rows[i] for i in indices]
        handle = self.parts.generators.submit(rows, seed=round_seed(self.c.run.seed, round_))
        return Pending(round_, list(indices), self.sampler.state(), handle=handle)

    def push_weights(self, force: bool = False) -> float:
        """Make the generators serve the learner's weights; returns seconds. ``force``: publish
        even when they serve this version already (a rebuilt learner's first publication)."""
        if self.state.policy_version == self.learner_version and not force:
            return 0.0
        t = time.perf_counter()
        self.pushing = True
        self.sync_path = self.parts.sync(self.learner_version).get("path")
        self.pushing = False
        self.state.policy_version = self.learner_version
        return time.perf_counter() - t

    def evaluate(self) -> float | None:
        if self.eval_prompts is None:
            return None
        judges = self.parts.eval_judges or self.parts.judges
        groups = self.parts.generators.sample(self.eval_prompts.rows, seed=self.c.run.seed, greedy=True)
        items = [g.to_item() for g in groups if not g.skipped]
        scores = judges.score(items).scores if items else []
        # A greedy answer the judge cannot score counts as wrong: eval must not flatter the model.
        per_prompt = [(s[0] if s and s[0] is not None else 0.0) for s in scores]
        per_prompt += [0.0] * (len(groups) - len(items))
        return sum(per_prompt) / len(per_prompt) if per_prompt else None

    def run_round(self, r: int) -> dict | None:
        """Run round ``r``; returns its record, or None when a stop abandoned it before learning."""
        c, m = self.c, self.metrics
        t_round = time.perf_counter()
        rec: dict = {"round": r}
        sync_s = self.push_weights(force=True) if self.republish else 0.0
        self.republish = False

        # 1. sample (sync: now; async: collect what was submitted last round, then start the next)
        m.set_phase("sample", r, policy_version=self.state.policy_version)
        t = time.perf_counter()
        self.learn_started = False
        self.sync_path = None
        if self.pending is None and self.bank is None:
            self.pending = self.submit(r)
        assert self.bank is not None or self.pending.round == r, (self.pending.round, r)
        self.faults.fire("sample", r, self.parts)
        if self.bank is not None:  # this round's share of the window's samples
            groups = self.bank.take(r, self.state.policy_version, lambda j: self.collect(self.submit(j)))
            sampler_after_this_round = self.sampler.state()
        else:
            groups = self.collect(self.pending)
            self.in_hand, self.pending = self.pending, None
            sampler_after_this_round = self.in_hand.sampler_after
        gen_wait_s = time.perf_counter() - t
        gen_s = max((g.sample_s for g in groups), default=0.0) or gen_wait_s
        if c.loop.mode == "async":
            sync_s += self.push_weights()
            if r < c.loop.rounds or c.loop.rounds == 0:
                self.pending = self.submit(r + 1)
        completions = sum(len(g.completions) for g in groups)
        gen_tokens = sum(len(x.token_ids or ()) for g in groups for x in g.completions)
        if self.stop.is_set():
            return self.abandon()

        # 2. judge and select pairs
        m.set_phase("judge", r)
        t = time.perf_counter()
        live = [g for g in groups if not g.skipped]
        items = [g.to_item() for g in live]
        self.faults.fire("judge", r, self.parts)
        scored = self.parts.judges.score(items) if items else None
        scores = scored.scores if scored else []
        sel = self.pair_maker.make(
            items, scores, versions=[g.policy_version for g in live], prompt_token_ids=[g.prompt_token_ids for g in live],
            rng=random.Random(round_seed(c.run.seed, r)), length_counts=self.state.length_counts, judges=self.parts.judges,
        )
        dropped = Counter(sel.dropped)
        dropped["too_long"] += sum(1 for g in groups if g.skipped)
        pairs = sel.pairs
        if c.loop.mode == "async":  # sync mode samples with the learner's own weights: nothing is stale
            # Stale = behind the policy that was meant to sample (a window's samples are old by design).
            newest = self.bank.sample_version(r) if self.bank is not None else self.learner_version
            pairs = [p for p in pairs if newest - p.policy_version <= c.loop.max_policy_lag]
        dropped["stale"] += len(sel.pairs) - len(pairs)
        judge_s = time.perf_counter() - t
        if self.stop.is_set():
            return self.abandon()

        # 3. learn (skipped when the round has no pairs)
        m.set_phase("learn", r)
        t = time.perf_counter()
        report: dict = {}
        beta = beta_for_round(c.learner.beta, r, self.state.beta)
        if pairs:
            lag = max(self.learner_version - p.policy_version for p in pairs)
            self.learn_started = True  # from here on a failure may leave some of the round's steps applied
            self.faults.fire("learn", r, self.parts)
            report = self.parts.learner.train(pairs, round=r, beta=beta)
            if report.get("weights_changed", True):
                self.learner_version += 1
        else:
            lag = 0
            self.state.rounds_without_pairs += 1
            log.info("round %d: no pairs (%s); learner step skipped", r, dict(dropped))
        learn_s = time.perf_counter() - t

        # 4. push weights (sync mode; async pushes at the start of the next round)
        m.set_phase("sync", r)
        self.faults.fire("sync", r, self.parts)
        if c.loop.mode == "sync":
            sync_s += self.push_weights()

        # 5. evaluate, write pairs and the metrics line
        eval_reward, eval_s = None, 0.0
        if c.loop.eval_every and (r % c.loop.eval_every == 0 or r == c.loop.rounds):
            m.set_phase("eval", r)
            t = time.perf_counter()
            if c.loop.mode == "async":  # eval the weights just trained: let sampling finish, then push
                sync_s += self.drain_and_push()
            eval_reward = self.evaluate()
            eval_s = time.perf_counter() - t

        self.state.round = r
        self.state.pairs_total += len(pairs)
        self.state.beta = carry_beta(c.learner.beta, beta, report.get("kl"))
        self.state.length_counts = sel.length_counts
        self.state.sampler = sampler_after_this_round if c.loop.mode == "async" else self.sampler.state()
        self.rd.write_pairs(r, pair_records(pairs, r))
        all_scores = [s for row in scores for s in row]
        rec.update({
            "policy_version": self.state.policy_version,
            "prompts": len(groups),
            "prompts_sha": hashlib.sha1(json.dumps([g.prompt for g in groups]).encode()).hexdigest()[:12],
            "data_cursor": self.state.sampler,
            "completions": completions,
            "pairs": len(pairs),
            "pairs_dropped": dict(dropped),
            **pair_figures(pairs, c.pairs.sources),
            "reward_mean": _mean(all_scores),
            "reward_chosen": _mean([p.chosen_score for p in pairs]),
            "reward_rejected": _mean([p.rejected_score for p in pairs]),
            "beta": beta,
            "lr": report.get("lr"),
            "loss": report.get("loss"),
            "nll": report.get("nll"),
            "reward_accuracy": report.get("reward_accuracy"),
            "reward_margin": report.get("reward_margin"),
            "logp_chosen": report.get("logp_chosen"),
            "logp_rejected": report.get("logp_rejected"),
            "kl": report.get("kl"),
            "grad_norm": report.get("grad_norm"),
            "skipped_steps": report.get("skipped_steps", 0),
            "overflow_steps": report.get("overflow_steps", 0),
            "pad_share": report.get("pad_share"),
            "loss_scale": report.get("loss_scale"),
            "gen_tokens": gen_tokens,
            "gen_tokens_per_s": gen_tokens / gen_s if gen_s > 0 else None,
            "gen_s": gen_s,
            "gen_wait_s": gen_wait_s,
            "judge_s": judge_s,
            "learn_s": learn_s,
            "sync_s": sync_s,
            "sync_path": self.sync_path,
            "eval_s": eval_s,
            "round_s": time.perf_counter() - t_round,
            "policy_lag": lag,
            "judge_failures": dict(scored.failures) if scored else {},
            "corrector_failures": sel.corrector_failures,
            "restarts": self.restarts(),
            "generator_versions": self.parts.generators.served_versions(),
        })
        if self.bank is not None:
            rec.update(self.bank.record(r))
        rec["rss_mb"] = self.memory.sample(actor_handles(self.parts), rec["restarts"])
        rec["rss_peak_mb"] = self.memory.peaks
        if eval_reward is not None:
            rec["eval_reward"] = eval_reward
        self.committed_version, self.in_hand = self.learner_version, None
        return rec

    def abandon(self) -> None:
        """A stop before learning: async mode keeps the round's samples as the pending round (a
        checkpoint saves them), so a resumed run trains on exactly what this one drew."""
        if self.c.loop.mode == "async" and self.in_hand is not None:
            self.pending = self.in_hand
            self.sampler = PromptSampler.from_state(self.pending.sampler_after, len(self.prompts), self.c.run.seed)
        return None

    def drain_and_push(self) -> float:
        """Async mode: wait for the in-flight sampling, keep its result, push the new weights."""
        t = time.perf_counter()
        if self.pending is not None:
            self.collect(self.pending)
        self.push_weights()
        return time.perf_counter() - t

    def collect(self, pending: Pending) -> list:
        if pending.groups is None:
            pending.groups = self.parts.generators.collect(pending.handle)
            pending.handle = None
        return pending.groups

    def restarts(self) -> dict:
        return {
            "generator": getattr(self.parts.generators, "restarts", 0),
            "judge": getattr(self.parts.judges, "restarts", 0),
            "learner": self.learner_restarts,
            "round_retries": self.round_retries,
            "nonfinite_updates": self.nonfinite_updates,
        }

    # --- recovery ------------------------------------------------------------------------------
    def recover(self, r: int, error: Exception) -> None:
        """Make round ``r`` safe to run again from the state it started from: keep its samples
        if they were collected (else rewind the prompt cursor and drop in-flight sampling),
        replace a hung generator, bring back a learner that died, hung or had started the
        round's steps, and give the generators back the round-start weights if a push of the
        failed attempt's weights began."""

        self.round_retries += 1
        if self.in_hand is not None and self.in_hand.round == r:
            self.pending = self.in_hand  # the same prompts, sampled with the same weights
            self.sampler = PromptSampler.from_state(self.pending.sampler_after, len(self.prompts), self.c.run.seed)
        else:
            self.pending = None
            self.sampler = (PromptSampler.from_state(self.state.sampler, len(self.prompts), self.c.run.seed)
                            if self.state.sampler else PromptSampler(len(self.prompts), self.c.run.seed))
        self.in_hand = None
        if isinstance(error, GeneratorHung):
            self.parts.generators.restart_actor(error.index)
        alive = self.learner_alive()
        if not alive or self.learn_started:
            self.restore_learner(rebuild=not alive)
        self.learner_version = self.committed_version
        if self.pushing or self.state.policy_version > self.committed_version:
            log.warning("re-syncing the generators to the round-start weights (version %d)", self.committed_version)
            self.pushing = True
            self.parts.sync(self.committed_version)
            self.pushing = False
            self.republish = False  # that was the rebuilt learner's publication
            self.state.policy_version = self.committed_version

    def rewind_to_last_round(self) -> None:
        """Before a checkpoint of the last completed round on the way out: the failed attempt's
        version is dropped, and only its already collected async samples stay pending (what that
        checkpoint would have held); sampling still in flight is not waited for."""
        self.learner_version = self.committed_version
        held = self.in_hand
        keep = self.c.loop.mode == "async" and held is not None and held.groups is not None \
            and held.round == self.state.round + 1
        self.pending, self.in_hand = (held if keep else None), None

    def learner_alive(self) -> bool:
        import ray

        try:
            ray.get([w.apply.remote(_rank) for w in self.parts.learner.workers], timeout=30)
            return True
        except Exception:  # dead, or busy in a hung step: either way it must be replaced
            return False

    def restore_learner(self, rebuild: bool) -> None:
        """Bring the learner to the end of the last completed round: the newest good checkpoint,
        then the saved pairs of every round after it, trained again in order."""
        path, passed_over = self.rd.latest_good_checkpoint(checkpoint_problem)
        for reason in passed_over:
            log.warning("skipping checkpoint %s", reason)
        if rebuild or path is None:  # without a checkpoint, only a fresh learner has the initial weights
            self.learner_restarts += 1
            if self.learner_restarts > self.c.loop.max_actor_restarts:
                raise RuntimeError(f"the learner was rebuilt {self.learner_restarts - 1} times "
                                   f"(loop.max_actor_restarts={self.c.loop.max_actor_restarts}); giving up")
            log.warning("rebuilding the learner group")
            try:
                self.parts.learner.shutdown()
            except Exception as e:  # its workers may be gone already
                log.warning("shutting down the old learner group: %s", e)
            self.parts.learner = self.parts.make_learner()
            self.republish = True
        start = 0
        if path is not None:
            self.parts.learner.load(str(path))
            start = self.rd.read_checkpoint_state(path)["round"]
        used_beta = {m.get("round"): m.get("beta") for m in self.rd.read_metrics()}
        for j in range(start + 1, self.state.round + 1):
            pairs = pairs_from_records(self.rd.read_pairs(j))
            if pairs:
                beta = used_beta.get(j) or beta_for_round(self.c.learner.beta, j, None)
                self.parts.learner.train(pairs, round=j, beta=beta)
        log.info("learner restored: %s, then the pairs of rounds %d..%d replayed",
                 path.name if path else "initial weights", start + 1, self.state.round)
        # A rebuilt learner publishes its weights (the same version: they are the round-start weights)
        # at the start of the retried round, so that a generator restarted later re-syncs from the
        # new group's publication, and an NCCL session is re-opened with the new group.


def _rank(worker) -> int:
    return worker.rank


def format_round(rec: dict, rounds: int) -> str:
    def f(key, fmt="{:.3f}"):
        v = rec.get(key)
        return "-" if v is None else fmt.format(v)

    total = f"/{rounds}" if rounds else ""
    dropped = " ".join(f"{k} {v}" for k, v in sorted(rec.get("pairs_dropped", {}).items()) if v)
    line = (
        f"round {rec['round']}{total} v{rec.get('policy_version')} | prompts {rec.get('prompts')} "
        f"pairs {rec.get('pairs')}" + (f" (dropped: {dropped})" if dropped else "") +
        f" | reward {f('reward_mean')} chosen {f('reward_chosen')} rejected {f('reward_rejected')}"
        f" | loss {f('loss')} acc {f('reward_accuracy')} margin {f('reward_margin')} kl {f('kl')} β {f('beta', '{:.3g}')}"
    )
    if "eval_reward" in rec:
        line += f" | eval {f('eval_reward')}"
    line += (
        f" | gen {f('gen_s', '{:.1f}')}s ({f('gen_tokens_per_s', '{:.0f}')} tok/s) judge {f('judge_s', '{:.2f}')}s "
        f"learn {f('learn_s', '{:.2f}')}s sync {f('sync_s', '{:.3f}')}s round {f('round_s', '{:.1f}')}s"
    )
    return line


def drive(loop: Loop, save_checkpoint) -> int:
    """Run rounds until the limit or a stop; checkpoint every k rounds, at the end and on stop.

    ``save_checkpoint(state)`` writes a checkpoint of the loop state (and the learner).
    Returns the number of rounds completed in this call.
    """
    c, rd = loop.c, loop.rd
    done = 0
    last_checkpointed = loop.state.round
    if loop.state.round == 0 and c.loop.eval_every:
        loop.metrics.set_phase("eval", 0)
        t = time.perf_counter()
        eval_reward = loop.evaluate()
        if eval_reward is not None:
            rec = {"round": 0, "policy_version": 0, "eval_reward": eval_reward, "eval_s": time.perf_counter() - t}
            publish(loop, rec)
            log.info("round 0 (before training) | eval %.3f", eval_reward)
    r = loop.state.round
    while not loop.stop.is_set() and (c.loop.rounds == 0 or r < c.loop.rounds):
        r += 1
        try:
            rec = run_with_retries(loop, r)
        except Exception:
            if loop.state.round != last_checkpointed:
                checkpoint_before_failing(loop, save_checkpoint)
            raise
        if rec is None:
            log.info("stop requested: round %d abandoned before learning", r)
            break
        publish(loop, rec)
        rd.write_status({**loop.metrics.status(), "phase": "between rounds"})
        log.info(format_round(rec, c.loop.rounds))
        done += 1
        if c.loop.checkpoint_every and r % c.loop.checkpoint_every == 0:
            loop.metrics.set_phase("checkpoint", r)
            save_checkpoint(loop.state)
            last_checkpointed = r
    if loop.state.round != last_checkpointed or loop.state.round == 0:
        loop.metrics.set_phase("checkpoint", loop.state.round)
        save_checkpoint(loop.state)
    loop.metrics.set_phase("stopped" if loop.stop.is_set() else "finished", loop.state.round)
    rd.write_status(loop.metrics.status())
    return done


def publish(loop: Loop, rec: dict) -> None:
    """Write a round's metrics line, then hand it to Prometheus and the trackers."""
    if loop.trackers is not None:
        rec["tracker_errors"] = dict(loop.trackers.errors)
    loop.rd.append_metrics(rec)
    loop.metrics.record_round(rec)
    if loop.trackers is not None:
        loop.trackers.log_round(rec)


def checkpoint_before_failing(loop: Loop, save_checkpoint) -> None:
    """The run is stopping on an error: keep the rounds completed since the last checkpoint. A
    learner that already stepped in the failed round is first brought back to the last completed
    one; a learner that is gone is not rebuilt for this. Best effort: a failure here is logged,
    and the run's own error is what gets raised."""
    try:
        if not loop.learner_alive():
            log.warning("the learner is gone: no checkpoint of round %d before stopping", loop.state.round)
            return
        loop.metrics.set_phase("checkpoint", loop.state.round)
        if loop.learn_started:
            loop.restore_learner(rebuild=False)
        loop.rewind_to_last_round()
        save_checkpoint(loop.state)
    except Exception as e:
        log.warning("could not checkpoint round %d before stopping: %s: %s", loop.state.round, type(e).__name__, e)


def run_with_retries(loop: Loop, r: int) -> dict | None:
    """Run round ``r``; a failure is recovered from and the round redone, up to
    ``loop.max_round_retries`` times, then the run stops with the round's last error."""

    failures = 0
    while True:
        try:
            return loop.run_round(r)
        except PlacementError:  # no alive node can hold a part: a retry would only wait again
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
            loop.recover(r, e)

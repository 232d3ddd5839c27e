"""The self-improvement loop, top to bottom.

One round: draw prompts -> generators sample n answers each -> judges score them (and write
corrections) -> pairs are made -> the learner takes DPO steps -> the new weights go to the
generators -> the round's pairs, metrics line and (every k rounds) a checkpoint are written.

``sync`` mode is strictly on-policy. ``async`` mode starts sampling round t+1 (with the weights
of round t-1's training) before judging and training on round t, so generation overlaps judging
and learning; pairs more than ``loop.max_policy_lag`` versions behind the learner are dropped.
A failed round is redone from the state it started from (``orchestrator.loop.recovery``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections import Counter
from typing import Any, Callable

from orchestrator.loop.beta import beta_for_round, carry_beta
from orchestrator.loop.data import PromptSampler, PromptSet
from orchestrator.loop.faults import FaultInjector
from orchestrator.loop.record import Judged, Learned, Sampled, format_round, publish, round_record
from orchestrator.loop.recovery import checkpoint_before_failing, run_with_retries
from orchestrator.loop.regenerate import SampleBank
from orchestrator.loop.state import DrawnRound, LoopState, Parts, round_seed
from orchestrator.observe.metrics import Metrics
from orchestrator.observe.procs import ProcessMemory, actor_handles
from orchestrator.pairs.make import PairMaker
from orchestrator.rundir import RunDir, pair_records
from orchestrator.service.hooks import Service

log = logging.getLogger("odpo.loop")


class Loop:
    def __init__(self, config, rundir: RunDir, parts: Parts, prompts: PromptSet,
                 eval_prompts: PromptSet | None, metrics: Metrics, stop: threading.Event,
                 state: LoopState, service: Service | None = None):
        self.c, self.rd, self.parts, self.metrics, self.stop = config, rundir, parts, metrics, stop
        self.prompts, self.eval_prompts, self.state = prompts, eval_prompts, state
        self.sampler = (PromptSampler.from_state(state.sampler, len(prompts), config.run.seed)
                        if state.sampler else PromptSampler(len(prompts), config.run.seed))
        self.learner_version = state.policy_version  # weights the learner holds
        self.committed_version = state.policy_version  # the learner's version when the last round completed
        self.pending: DrawnRound | None = None  # the next round's sampling (async mode; or kept for a redo)
        self.in_hand: DrawnRound | None = None  # this round's collected samples, kept should it be redone
        self.memory = ProcessMemory()
        self.faults = FaultInjector(config.faults)
        self.pair_maker = PairMaker(config.pairs, config.model)
        self.learner_restarts = 0
        self.round_retries = 0
        self.nonfinite_updates = 0  # rounds redone because a step made the weights inf/NaN
        self.push_retries = 0  # weight pushes retried from the learner's current weights
        self.restores = 0  # learner restores from a checkpoint (then the later rounds' pairs replayed)
        self.adopted: DrawnRound | None = None  # a redo's next-round sampling, kept from the failed attempt
        self.learn_started = False  # the learner may have stepped in this attempt of the round
        self.pushing = False  # a weight push is (or was, when it failed) under way
        # loop.regenerate_every > 1: offline / iterative DPO (orchestrator/loop/regenerate.py)
        self.bank = SampleBank(rundir.root, config.loop.regenerate_every) \
            if config.loop.regenerate_every > 1 else None
        self.republish = False  # a rebuilt learner publishes its weights before anything samples
        self.trackers = None  # orchestrator.observe.trackers.Trackers when report.to names any (set by run.py)
        self.sync_path: str | None = None  # how this round's weight sync travelled (weight_sync's ``path``)
        self.save_checkpoint: Callable[[LoopState], None] = lambda state: None  # set by ``drive``
        self.last_checkpointed = state.round
        # The inbox, live control, the evaluation gate and the idle guard (orchestrator/service/).
        self.service = service or Service(config, rundir, metrics, stop, prompts.rows)

    # --- the round ------------------------------------------------------------------------------
    def run_round(self, r: int) -> dict | None:
        """Run round ``r``; returns its record, or None when a stop abandoned it before learning."""
        c, t_round = self.c, time.perf_counter()
        sync_s = self.push_weights(force=True) if self.republish else 0.0
        self.republish = False
        self.learn_started, self.sync_path = False, None
        sampled, pushed = self.sample(r)
        sync_s += pushed
        if self.stop.is_set():
            return self.abandon()
        judged = self.judge(r, sampled)
        if self.stop.is_set():
            return self.abandon()
        learned = self.learn(r, judged)
        self.metrics.set_phase("sync", r)  # sync mode pushes now; async at the start of the next round
        self.faults.fire("sync", r, self.parts)
        if c.loop.mode == "sync":
            sync_s += self.push_weights()
        eval_reward, eval_s = None, 0.0
        if c.loop.eval_every and (r % c.loop.eval_every == 0 or r == c.loop.rounds):
            self.metrics.set_phase("eval", r)
            t = time.perf_counter()
            if c.loop.mode == "async":  # eval the weights just trained: let sampling finish, then push
                sync_s += self.drain_and_push()
            eval_reward = self.evaluate()
            eval_s = time.perf_counter() - t

        # The round's state advances only once its outputs are durable: should writing them fail,
        # the redo starts from the same β, counts and cursor.
        nxt = dataclasses.replace(
            self.state, round=r, pairs_total=self.state.pairs_total + len(judged.pairs),
            rounds_without_pairs=self.state.rounds_without_pairs + (not judged.pairs),
            beta=carry_beta(c.learner.beta, learned.beta, learned.report.get("kl")),
            length_counts=judged.length_counts,
            sampler=sampled.sampler_after if c.loop.mode == "async" else self.sampler.state())
        rec = round_record(r, sampled, judged, learned, c.pairs.sources)
        rec.update({"policy_version": self.state.policy_version, "data_cursor": nxt.sampler,
                    "sync_s": sync_s, "sync_path": self.sync_path, "eval_s": eval_s,
                    "round_s": time.perf_counter() - t_round, "restarts": self.restarts(),
                    "generator_versions": self.parts.generators.served_versions()})
        if self.bank is not None:
            rec.update(self.bank.record(r))
        rec["rss_mb"] = self.memory.sample(actor_handles(self.parts), rec["restarts"])
        rec["rss_peak_mb"] = self.memory.peaks
        if eval_reward is not None:
            rec["eval_reward"] = eval_reward
        nxt.service = self.service.state_after(self, r, [g.row for g in sampled.groups], rec)
        self.write_outputs(r, rec, nxt, judged.pairs)
        self.state = nxt
        self.committed_version, self.in_hand = self.learner_version, None
        return rec

    def write_outputs(self, r: int, rec: dict, nxt: LoopState, pairs: list) -> None:
        """The round's pairs file, its metrics line and, when due, a checkpoint of ``nxt``."""
        self.faults.fire("write", r, self.parts)
        self.rd.write_pairs(r, pair_records(pairs, r))
        publish(self, rec)
        if (self.c.loop.checkpoint_every and r % self.c.loop.checkpoint_every == 0) or self.service.checkpoint_due(nxt, r):
            self.metrics.set_phase("checkpoint", r)
            self.save_checkpoint(nxt)
            self.last_checkpointed = r

    def sample(self, r: int) -> tuple[Sampled, float]:
        """Phase 1 (sync: sample now; async: collect what the last round submitted, push the new
        weights, then submit the next round); returns the samples and the seconds spent pushing."""
        c, sync_s = self.c, 0.0
        self.metrics.set_phase("sample", r, policy_version=self.state.policy_version)
        t = time.perf_counter()
        if self.pending is None and self.bank is None:
            self.pending = self.submit(r)
        assert self.bank is not None or self.pending.round == r, (self.pending.round, r)
        self.faults.fire("sample", r, self.parts)
        if self.bank is not None:  # this round's share of the window's samples
            groups = self.bank.take(r, self.state.policy_version, lambda j: self.collect(self.submit(j)))
            sampler_after = self.sampler.state()
        else:
            groups = self.collect(self.pending)
            self.in_hand, self.pending = self.pending, None
            sampler_after = self.in_hand.sampler_after
        gen_wait_s = time.perf_counter() - t
        gen_s = max((g.sample_s for g in groups), default=0.0) or gen_wait_s
        if c.loop.mode == "async":
            sync_s += self.push_weights()
            if r < c.loop.rounds or c.loop.rounds == 0:
                self.pending = self.adopt(r + 1) or self.submit(r + 1)
        return Sampled(groups, sampler_after, gen_s, gen_wait_s), sync_s

    def judge(self, r: int, sampled: Sampled) -> Judged:
        """Phase 2: score (and correct) the samples, make the pairs, drop stale ones (async)."""
        c = self.c
        self.metrics.set_phase("judge", r)
        t = time.perf_counter()
        live = [g for g in sampled.groups if not g.skipped]
        items = [g.to_item() for g in live]
        self.faults.fire("judge", r, self.parts)
        scored = self.parts.judges.score(items, correct="correction" in c.pairs.sources) if items else None
        scores = scored.scores if scored else []
        sel = self.pair_maker.make(
            items, scores, versions=[g.policy_version for g in live], prompt_token_ids=[g.prompt_token_ids for g in live],
            rng=random.Random(round_seed(c.run.seed, r)), length_counts=self.state.length_counts,
            corrections=scored.corrections if scored else None,
            corrector_failures=scored.corrector_failures if scored else None,
        )
        dropped = Counter(sel.dropped)
        dropped["too_long"] += sum(1 for g in sampled.groups if g.skipped)
        pairs = sel.pairs
        if c.loop.mode == "async":  # sync mode samples with the learner's own weights: nothing is stale
            # Stale = behind the policy that was meant to sample (a window's samples are old by design).
            newest = self.bank.sample_version(r) if self.bank is not None else self.learner_version
            pairs = [p for p in pairs if newest - p.policy_version <= c.loop.max_policy_lag]
        dropped["stale"] += len(sel.pairs) - len(pairs)
        return Judged(scores, pairs, dropped, sel.length_counts, time.perf_counter() - t,
                      judge_failures=dict(scored.failures) if scored else {},
                      corrector_failures=sel.corrector_failures)

    def learn(self, r: int, judged: Judged) -> Learned:
        """Phase 3: DPO steps on the round's pairs (skipped when it has none)."""
        self.metrics.set_phase("learn", r)
        t = time.perf_counter()
        report: dict[str, Any] = {}
        beta = beta_for_round(self.c.learner.beta, r, self.state.beta)
        lag = 0
        if judged.pairs:
            lag = max(self.learner_version - p.policy_version for p in judged.pairs)
            self.learn_started = True  # from here on a failure may leave some of the round's steps applied
            self.faults.fire("learn", r, self.parts)
            report = self.parts.learner.train(judged.pairs, round=r, beta=beta)
            if report.get("weights_changed", True):
                self.learner_version += 1
        else:
            log.info("round %d: no pairs (%s); learner step skipped", r, dict(judged.dropped))
        return Learned(report, beta, lag, time.perf_counter() - t)

    # --- helpers of the phases -----------------------------------------------------------------
    def submit(self, round_: int) -> DrawnRound:
        """Draw round ``round_``'s prompts and start sampling them."""
        indices, rows = self.service.draw(self, self.c.loop.prompts_per_round)  # inbox rows: index -1
        call = self.parts.generators.submit(rows, seed=round_seed(self.c.run.seed, round_),
                                            overrides=self.service.sampling_overrides())
        return DrawnRound(round_, indices, self.sampler.state(), call=call)

    def adopt(self, round_: int) -> DrawnRound | None:
        """A redo's sampling of round ``round_``, taken over from the failed attempt, which had
        submitted it with the same prompts, seed and weights (async mode); None when there is none."""
        drawn, self.adopted = self.adopted, None
        if drawn is None or drawn.round != round_:
            return None
        self.sampler = PromptSampler.from_state(drawn.sampler_after, len(self.prompts), self.c.run.seed)
        return drawn

    def collect(self, drawn: DrawnRound) -> list:
        if drawn.groups is None:
            drawn.groups = self.parts.generators.collect(drawn.call)
            drawn.call = None
        return drawn.groups

    def push_weights(self, force: bool = False) -> float:
        """Make the generators serve the learner's weights; returns seconds. ``force``: publish
        even when they serve this version already (a rebuilt learner's first publication)."""
        if self.state.policy_version == self.learner_version and not force:
            return 0.0
        t = time.perf_counter()
        cfg = self.c.sync
        self.pushing = True
        for attempt in range(cfg.push_retries + 1):
            try:
                self.sync_path = self.parts.sync(self.learner_version).get("path")
                break
            except Exception as e:  # the learner's weights are intact: push them again, not the round
                if attempt == cfg.push_retries:
                    raise
                self.push_retries += 1
                wait = cfg.push_backoff_s * 2**attempt
                log.warning("weight push of version %d failed (%s: %s); retrying in %.1fs (%d/%d)",
                            self.learner_version, type(e).__name__, e, wait, attempt + 1, cfg.push_retries)
                time.sleep(wait)
        self.pushing = False
        self.state.policy_version = self.learner_version
        return time.perf_counter() - t

    def drain_and_push(self) -> float:
        """Async mode: wait for the in-flight sampling, keep its result, push the new weights."""
        t = time.perf_counter()
        if self.pending is not None:
            self.collect(self.pending)
        self.push_weights()
        return time.perf_counter() - t

    def evaluate(self) -> float | None:
        """Held-out reward of the current policy: one greedy answer per eval prompt, judged."""
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

    def abandon(self) -> None:
        """A stop before learning: async mode keeps the round's samples as the pending round (a
        checkpoint saves them), so a resumed run trains on exactly what this one drew."""
        if self.c.loop.mode == "async" and self.in_hand is not None:
            self.pending = self.in_hand
            self.sampler = PromptSampler.from_state(self.pending.sampler_after, len(self.prompts), self.c.run.seed)
        return None

    def restarts(self) -> dict:
        return {
            "generator": getattr(self.parts.generators, "restarts", 0),
            "judge": getattr(self.parts.judges, "restarts", 0),
            "learner": self.learner_restarts,
            "round_retries": self.round_retries,
            "nonfinite_updates": self.nonfinite_updates,
            "restores": self.restores,
            "push_retries": self.push_retries,
        }


def drive(loop: Loop, save_checkpoint: Callable[[LoopState], None]) -> int:
    """Run rounds until the limit or a stop; checkpoint every k rounds (as part of the round), at
    the end and on stop.

    ``save_checkpoint(state)`` writes a checkpoint of the loop state (and the learner).
    Returns the number of rounds completed in this call.
    """
    c, rd = loop.c, loop.rd
    loop.save_checkpoint, loop.last_checkpointed = save_checkpoint, loop.state.round
    done = 0
    if loop.state.round == 0 and c.loop.eval_every:
        loop.metrics.set_phase("eval", 0)
        t = time.perf_counter()
        eval_reward = loop.evaluate()
        if eval_reward is not None:
            rec = {"round": 0, "policy_version": 0, "eval_reward": eval_reward, "eval_s": time.perf_counter() - t}
            publish(loop, rec)
            log.info("round 0 (before training) | eval %.3f", eval_reward)
        loop.service.first_eval(loop, eval_reward, save_checkpoint)
    r = loop.state.round
    while not loop.stop.is_set() and (c.loop.rounds == 0 or r < c.loop.rounds):
        try:  # the boundary: pause, stop --after-round, live changes, a rollback the gate made due
            if not loop.service.before_round(loop, r + 1, save_checkpoint):
                break
            r += 1
            rec = run_with_retries(loop, r)
            if rec is not None:
                loop.service.check_idle(loop)
        except Exception:
            if loop.state.round != loop.last_checkpointed:
                checkpoint_before_failing(loop, save_checkpoint)
            raise
        if rec is None:
            log.info("stop requested: round %d abandoned before learning", r)
            break
        rd.write_status({**loop.metrics.status(), "phase": "between rounds"})
        log.info(format_round(rec, c.loop.rounds))
        done += 1
    if loop.state.round != loop.last_checkpointed or loop.state.round == 0:
        loop.metrics.set_phase("checkpoint", loop.state.round)
        save_checkpoint(loop.state)
    loop.metrics.set_phase("stopped" if loop.stop.is_set() else "finished", loop.state.round)
    rd.write_status(loop.metrics.status())
    return done

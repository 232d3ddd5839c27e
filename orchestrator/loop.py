"""The self-improvement loop, top to bottom.

One round: draw prompts -> generators sample n answers each -> judges score them -> pairs are
selected -> the learner takes DPO steps -> the new weights go to the generators -> the round's
pairs, metrics line and (every k rounds) a checkpoint are written.

``sync`` mode is strictly on-policy. ``async`` mode starts sampling round t+1 (with the weights
of round t-1's training) before judging and training on round t, so generation overlaps judging
and learning; pairs more than ``loop.max_policy_lag`` versions behind the learner are dropped.
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

from orchestrator.beta import beta_for_round, carry_beta
from orchestrator.data import PromptSampler, PromptSet
from orchestrator.metrics import Metrics
from orchestrator.pairing import PairMaker, pair_figures
from orchestrator.procs import ProcessMemory, actor_handles
from orchestrator.faults import FaultInjector
from orchestrator.rundir import RunDir, checkpoint_problem, pair_records, pairs_from_records

log = logging.getLogger("odpo.loop")


@dataclass
class Parts:
    """The running actors the loop drives (built by ``orchestrator.run``)."""

    generators: object  # actors.generator.GeneratorPool
    judges: object  # actors.judge_host.JudgePool
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
    """What a checkpoint must carry to resume exactly."""

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
        self.pending = None  # async mode: sampling submitted for the next round
        self.memory = ProcessMemory()
        self.faults = FaultInjector(config.faults)
        self.pair_maker = PairMaker(config.pairs, config.model)
        self.learner_restarts = 0
        self.round_retries = 0
        self.trained_this_attempt = False
        self.sampler_before_pending: dict | None = None
        self.republish = False  # a rebuilt learner publishes its weights before anything samples
        self.trackers = None  # orchestrator.trackers.Trackers when report.to names any (set by run.py)

    # --- one round's phases ----------------------------------------------------------------------
    def draw(self) -> list[dict]:
        return [self.prompts.rows[i] for i in self.sampler.draw(self.c.loop.prompts_per_round)]

    def submit(self, round_: int):
        self.sampler_before_pending = self.sampler.state()
        rows = self.draw()
        return self.parts.generators.submit(rows, seed=round_seed(self.c.run.seed, round_))

    def push_weights(self) -> float:
        """Make the generators serve the learner's weights; returns seconds."""
        if self.state.policy_version == self.learner_version:
            return 0.0
        t = time.perf_counter()
        self.parts.sync(self.learner_version)
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
        sync_s = self.push_weights() if self.republish else 0.0
        self.republish = False

        # 1. sample (sync: now; async: collect what was submitted last round, then start the next)
        m.set_phase("sample", r, policy_version=self.state.policy_version)
        t = time.perf_counter()
        self.trained_this_attempt = False
        if self.pending is None:
            self.pending = self.submit(r)
        self.faults.fire("sample", r, self.parts)
        groups = self.collect(self.pending)
        sampler_after_this_round = self.sampler.state()
        self.pending = None
        gen_wait_s = time.perf_counter() - t
        gen_s = max((g.sample_s for g in groups), default=0.0) or gen_wait_s
        if c.loop.mode == "async":
            sync_s += self.push_weights()
            if r < c.loop.rounds or c.loop.rounds == 0:
                sampler_after_this_round = self.sampler.state()
                self.pending = self.submit(r + 1)
        completions = sum(len(g.completions) for g in groups)
        gen_tokens = sum(len(x.token_ids or ()) for g in groups for x in g.completions)
        if self.stop.is_set():
            return None

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
        pairs = [p for p in sel.pairs if self.learner_version - p.policy_version <= c.loop.max_policy_lag]
        dropped["stale"] += len(sel.pairs) - len(pairs)
        judge_s = time.perf_counter() - t
        if self.stop.is_set():
            return None

        # 3. learn (skipped when the round has no pairs)
        m.set_phase("learn", r)
        t = time.perf_counter()
        report: dict = {}
        beta = beta_for_round(c.learner.beta, r, self.state.beta)
        if pairs:
            lag = max(self.learner_version - p.policy_version for p in pairs)
            self.faults.fire("learn", r, self.parts)
            report = self.parts.learner.train(pairs, round=r, beta=beta)
            self.trained_this_attempt = True
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
            "loss": report.get("loss"),
            "nll": report.get("nll"),
            "reward_accuracy": report.get("reward_accuracy"),
            "reward_margin": report.get("reward_margin"),
            "logp_chosen": report.get("logp_chosen"),
            "logp_rejected": report.get("logp_rejected"),
            "kl": report.get("kl"),
            "grad_norm": report.get("grad_norm"),
            "skipped_steps": report.get("skipped_steps", 0),
            "gen_tokens": gen_tokens,
            "gen_tokens_per_s": gen_tokens / gen_s if gen_s > 0 else None,
            "gen_s": gen_s,
            "gen_wait_s": gen_wait_s,
            "judge_s": judge_s,
            "learn_s": learn_s,
            "sync_s": sync_s,
            "eval_s": eval_s,
            "round_s": time.perf_counter() - t_round,
            "policy_lag": lag,
            "judge_failures": dict(scored.failures) if scored else {},
            "corrector_failures": sel.corrector_failures,
            "restarts": self.restarts(),
            "generator_versions": self.parts.generators.served_versions(),
        })
        rec["rss_mb"] = self.memory.sample(actor_handles(self.parts), rec["restarts"])
        rec["rss_peak_mb"] = self.memory.peaks
        if eval_reward is not None:
            rec["eval_reward"] = eval_reward
        return rec

    def drain_and_push(self) -> float:
        """Async mode: wait for the in-flight sampling, keep its result, push the new weights."""
        t = time.perf_counter()
        if self.pending is not None:
            self.pending = _Ready(self.collect(self.pending))
        self.push_weights()
        return time.perf_counter() - t

    def collect(self, pending):
        return pending.groups if isinstance(pending, _Ready) else self.parts.generators.collect(pending)

    def restarts(self) -> dict:
        return {
            "generator": getattr(self.parts.generators, "restarts", 0),
            "judge": getattr(self.parts.judges, "restarts", 0),
            "learner": self.learner_restarts,
            "round_retries": self.round_retries,
        }

    # --- recovery ------------------------------------------------------------------------------
    def recover(self, r: int, error: Exception) -> None:
        """Make round ``r`` safe to run again: rewind the prompt cursor, drop in-flight sampling,
        replace a hung generator, and bring back a learner that died, hung or already stepped."""
        from actors.generator import GeneratorHung

        self.round_retries += 1
        self.pending = None
        self.sampler = (PromptSampler.from_state(self.state.sampler, len(self.prompts), self.c.run.seed)
                        if self.state.sampler else PromptSampler(len(self.prompts), self.c.run.seed))
        if isinstance(error, GeneratorHung):
            self.parts.generators.restart_actor(error.index)
        alive = self.learner_alive()
        if not alive or self.trained_this_attempt:
            self.restore_learner(rebuild=not alive)

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
        # The generators get these weights under a new version number; a rebuilt learner
        # publishes them at the start of the retried round (a publication made by the old group
        # is not re-applied with the new one, and an NCCL session is re-opened with it).
        self.learner_version = max(self.learner_version, self.state.policy_version) + 1


def _rank(worker) -> int:
    return worker.rank


class _Ready:
    """A sampling result already in hand, passed where a pending handle is expected."""

    def __init__(self, groups):
        self.groups = groups


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
        rec = run_with_retries(loop, r)
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


def run_with_retries(loop: Loop, r: int) -> dict | None:
    """Run round ``r``; a failure is recovered from and the round redone, up to
    ``loop.max_round_retries`` times, then the run stops with the round's last error."""
    failures = 0
    while True:
        try:
            return loop.run_round(r)
        except Exception as e:  # any failure of a part: the round is redone after recovery
            failures += 1
            if failures > loop.c.loop.max_round_retries:
                raise RuntimeError(f"round {r} failed {failures} times (loop.max_round_retries="
                                   f"{loop.c.loop.max_round_retries}); last error: {type(e).__name__}: {e}") from e
            log.warning("round %d failed (%s: %s); recovering and redoing it (%d/%d)", r, type(e).__name__, e,
                        failures, loop.c.loop.max_round_retries)
            loop.recover(r, e)

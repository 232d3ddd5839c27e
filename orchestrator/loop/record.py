"""A round's record: the figures of its phases gathered into one metrics line, written to
``metrics.jsonl``, Prometheus and the trackers, and its one-line summary for the job log."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from common.types import PreferencePair, SampleGroup
from orchestrator.pairs.make import pair_figures


@dataclass
class Sampled:
    """Phase 1: the round's samples."""

    groups: list[SampleGroup]
    sampler_after: dict
    """The prompt cursor once this round's prompts were drawn."""
    gen_s: float
    gen_wait_s: float

    @property
    def completions(self) -> int:
        return sum(len(g.completions) for g in self.groups)

    @property
    def tokens(self) -> int:
        return sum(len(x.token_ids or ()) for g in self.groups for x in g.completions)


@dataclass
class Judged:
    """Phase 2: scores, corrections and the pairs made of them."""

    scores: list[list[float | None]]
    pairs: list[PreferencePair]
    dropped: Counter
    length_counts: dict
    judge_s: float
    judge_failures: dict = field(default_factory=dict)
    corrector_failures: dict = field(default_factory=dict)


@dataclass
class Learned:
    """Phase 3: the learner's report (empty when the round had no pairs)."""

    report: dict[str, Any]
    beta: float
    lag: int
    learn_s: float


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


_LEARNER_FIGURES = ("lr", "loss", "nll", "reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected", "kl",
                    "grad_norm")


def round_record(r: int, sampled: Sampled, judged: Judged, learned: Learned, pair_sources: list[str]) -> dict:
    """The metrics line's figures of sampling, judging and learning (the loop adds the rest)."""
    report, pairs, groups = learned.report, judged.pairs, sampled.groups
    all_scores = [s for row in judged.scores for s in row]
    rec: dict[str, Any] = {
        "round": r,
        "prompts": len(groups),
        "prompts_sha": hashlib.sha1(json.dumps([g.prompt for g in groups]).encode()).hexdigest()[:12],
        "completions": sampled.completions,
        "pairs": len(pairs),
        "pairs_dropped": dict(judged.dropped),
        **pair_figures(pairs, pair_sources),
        "reward_mean": mean(all_scores),
        "reward_chosen": mean([p.chosen_score for p in pairs]),
        "reward_rejected": mean([p.rejected_score for p in pairs]),
        "beta": learned.beta,
    }
    rec.update({k: report.get(k) for k in _LEARNER_FIGURES})
    rec.update({
        "skipped_steps": report.get("skipped_steps", 0),
        "overflow_steps": report.get("overflow_steps", 0),
        "pad_share": report.get("pad_share"),
        "loss_scale": report.get("loss_scale"),
        "gen_tokens": sampled.tokens,
        "gen_tokens_per_s": sampled.tokens / sampled.gen_s if sampled.gen_s > 0 else None,
        "gen_s": sampled.gen_s,
        "gen_wait_s": sampled.gen_wait_s,
        "judge_s": judged.judge_s,
        "learn_s": learned.learn_s,
        "policy_lag": learned.lag,
        "judge_failures": judged.judge_failures,
        "corrector_failures": judged.corrector_failures,
    })
    return rec


def publish(loop: Any, rec: dict) -> None:
    """Write a round's metrics line, then hand it to Prometheus and the trackers."""
    if loop.trackers is not None:
        rec["tracker_errors"] = dict(loop.trackers.errors)
    loop.rd.append_metrics(rec)
    loop.metrics.record_round(rec)
    if loop.trackers is not None:
        loop.trackers.log_round(rec)


def format_round(rec: dict, rounds: int) -> str:
    """The round's line in the job log."""
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

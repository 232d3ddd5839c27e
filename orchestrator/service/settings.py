"""The config models of the service mechanisms (``data.inbox``, ``loop.gate``), kept out of
``orchestrator/config.py``, which composes them. Pure pydantic: no torch, Ray or I/O."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class InboxConfig(_Section):
    share: float = Field(1.0, gt=0, le=1)
    """Most of a round's prompts drawn from the inbox (``odpo add-prompts``, ``POST /prompts``) while it holds prompts not yet drawn, as a share of ``loop.prompts_per_round``: 1 = inbox prompts first, then the dataset's; 0.25 = at most a quarter of each round (at least one prompt while any waits). Each inbox prompt is drawn once."""
    max_rows: int = Field(100_000, ge=1)
    """Most rows one inbox batch may hold; a larger batch is refused whole."""


class GateConfig(_Section):
    enabled: bool = False
    """Watch ``metric`` after each evaluation and roll the policy back when it drops (off by default)."""
    metric: Literal["eval_reward", "reward_mean", "reward_accuracy", "reward_margin"] = "eval_reward"
    """The round figure the gate watches (higher is better); it acts on the rounds that have it (``eval_reward``: the eval rounds, ``loop.eval_every``)."""
    max_drop: float = Field(0.05, ge=0)
    """How far below the best value so far ``metric`` may fall (in its own units) before a round counts as a drop."""
    patience: int = Field(1, ge=1)
    """Drops in a row (rounds that have ``metric``) that trigger a rollback; a round within ``max_drop`` of the best resets the count."""
    lr_backoff: float = Field(0.5, gt=0, le=1)
    """At each rollback ``learner.lr`` is multiplied by this (recorded in ``config_changes.jsonl`` and kept by a resume)."""


def gate_problem(config) -> str | None:
    """Why ``loop.gate`` cannot work with the rest of a ``RunConfig`` (None when it can)."""
    gate = config.loop.gate
    if gate.enabled and gate.metric == "eval_reward" and not (config.loop.eval_every and config.data.eval_source):
        return ("loop.gate: watches eval_reward, which needs loop.eval_every > 0 and data.eval_source "
                "(or choose another loop.gate.metric)")
    return None

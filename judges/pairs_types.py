"""The preference pair: what pair selection produces and the learner consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from judges.base import Prompt


@dataclass
class PreferencePair:
    prompt: Prompt
    chosen: str
    rejected: str
    chosen_score: float | None
    rejected_score: float | None
    """The judge's scores; None for a side the judge did not score (a correction's written chosen)."""
    row: dict[str, Any] = field(default_factory=dict)
    """The prompt's dataset row (other columns, e.g. the gold answer) for the pairs file."""
    policy_version: int = 0
    """Version of the policy that sampled both answers."""
    prompt_token_ids: list[int] | None = None
    """The prompt's ids exactly as the generator's engine received them."""
    chosen_token_ids: list[int] | None = None
    rejected_token_ids: list[int] | None = None
    """The completion ids the learner trains: for a sampled side exactly what the engine returned
    (a sampled EOS or stop token included, nothing appended). Pairs files written before odpo
    carried ids end to end have no prompt ids and completion ids without their EOS: the learner
    re-tokenizes their prompt and appends the EOS, as it did when they were written."""
    chosen_finish_reason: str = "stop"
    rejected_finish_reason: str = "stop"
    """How each side ended (``stop``/``length``); used only when a side must be tokenized from text."""
    source: str = "best_worst"
    """How the pair was made: ``best_worst`` (both sides sampled) or ``correction`` (the chosen side
    was written, not sampled: off-policy by design, tokenized from its text)."""

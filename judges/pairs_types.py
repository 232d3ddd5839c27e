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
    chosen_score: float
    rejected_score: float
    row: dict[str, Any] = field(default_factory=dict)
    """The prompt's dataset row (other columns, e.g. the gold answer) for the pairs file."""
    policy_version: int = 0
    """Version of the policy that sampled both answers."""
    chosen_token_ids: list[int] | None = None
    rejected_token_ids: list[int] | None = None
    """Sampled completion token ids (without EOS) when known; the learner re-tokenizes otherwise."""
    chosen_finish_reason: str = "stop"
    rejected_finish_reason: str = "stop"
    """``stop`` completions end with EOS in the learner's sequence; ``length`` ones do not."""

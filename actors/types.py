"""Data the actors exchange with the orchestrator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from judges.base import Completion, JudgeItem, Prompt


@dataclass
class SampleGroup:
    """One prompt's ``n`` completions from one generator, tagged with the policy version."""

    prompt: Prompt
    row: dict[str, Any]
    completions: list[Completion]
    policy_version: int
    prompt_token_ids: list[int] = field(default_factory=list)
    """The prompt exactly as the engine received it (chat template, BOS and all): what the learner trains."""
    skipped: str | None = None
    """Why the prompt produced no completions (e.g. ``too_long``); None when sampled."""
    sample_s: float = 0.0
    """Seconds the generator spent on the call that produced this group."""

    def to_item(self) -> JudgeItem:
        return JudgeItem(prompt=self.prompt, completions=self.completions, row=self.row)

"""The data every stage of a round passes on, in one place.

generators → ``SampleGroup`` (a prompt's sampled ``Completion``s) → judges score ``JudgeItem``s →
pair making → ``PreferencePair`` → the learner. Plain dataclasses: they cross Ray as pickles and
are written to the run directory as JSON rows. This module imports nothing of odpo, so every
floor (judges, actors, orchestrator) may use it; the plug-in API re-exports ``Prompt``,
``Completion`` and ``JudgeItem`` from ``judges.base``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Prompt = str | list[dict[str, str]]
"""A prompt: plain text, or chat messages (``{"role", "content"}``) for the chat template."""


@dataclass
class Completion:
    """One sampled answer."""

    text: str
    finish_reason: Literal["stop", "length", "abort"] = "stop"
    """``stop`` when the model ended it (EOS, a stop token or a stop string), ``length`` when the token
    limit cut it off, ``abort`` when the engine gave up on it (never paired)."""
    logprob: float | None = None
    """Summed log-probability under the policy that sampled it (used for tie-breaks)."""
    token_ids: list[int] | None = None
    """The sampled token ids exactly as the engine returned them (a sampled EOS or stop token
    included), when a generator produced them: what the learner trains."""
    stop_reason: int | str | None = None
    """For ``stop``: None for EOS, the stop token id, or the stop string that ended the answer."""


@dataclass
class JudgeItem:
    """A prompt, its completions, and the rest of its dataset row (e.g. ``row["answer"]``)."""

    prompt: Prompt
    completions: list[Completion]
    row: dict[str, Any] = field(default_factory=dict)


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


@dataclass
class PreferencePair:
    """A chosen and a rejected answer to one prompt: what pair making produces and the learner trains."""

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

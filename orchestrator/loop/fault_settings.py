"""The config models of fault injection (``faults.events``), kept out of ``orchestrator/config.py``,
which composes them; ``orchestrator.loop.faults`` fires them. Pure pydantic: no torch, Ray or I/O."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class FaultSpec(_Section):
    kind: Literal["generator", "judge", "learner", "sync", "rundir", "disk"]
    """What to hit: a generator actor, a judge actor, a learner worker, a generator's next weight load, the write of the round's outputs, or the free space the checkpoints from ``round`` on see (``disk``)."""
    action: Literal["kill", "hang", "raise", "nan", "nan_weights", "full"] = "kill"
    """``kill`` (generator/judge/learner): end the actor as a crash would; ``hang`` (sync): the
    generator's next weight load sleeps ``seconds``; ``raise`` (sync): the generator's next weight
    load fails (the push is retried); ``raise`` (judge): its next ``count`` score calls
    raise; ``raise`` (learner): every rank's ``train`` raises after ``after_steps`` optimizer steps;
    ``nan`` (learner): its next ``count`` steps produce a NaN loss; ``nan_weights`` (learner): its
    next optimizer step leaves a NaN in rank 0's weights (the round is redone, nothing published);
    ``raise`` (rundir): writing the round's pairs fails as on a full disk (the round is redone);
    ``full`` (disk): the checkpoint folder reports 0 bytes free (the run stops before writing)."""
    round: int = Field(1, ge=1)
    """Round in which the fault fires (once)."""
    index: int = Field(0, ge=0)
    """Which actor of its kind (generator/judge actor index, learner rank)."""
    seconds: float = Field(0, ge=0)
    """For ``hang``: how long the call sleeps (set it past ``sync.timeout_s``)."""
    count: int = Field(1, ge=1)
    """For judge ``raise`` and ``nan``: how many calls or steps fail."""
    after_steps: int = Field(0, ge=0)
    """For learner ``raise``: optimizer steps of the round taken before every rank raises."""

    @model_validator(mode="after")
    def _action_fits_kind(self) -> "FaultSpec":
        allowed = {"generator": {"kill"}, "judge": {"kill", "raise"}, "learner": {"kill", "nan", "nan_weights", "raise"}, "sync": {"hang", "raise"},
                   "rundir": {"raise"}, "disk": {"full"}}
        if self.action not in allowed[self.kind]:
            raise ValueError(f"action {self.action!r} does not apply to kind {self.kind!r} (allowed: {sorted(allowed[self.kind])})")
        return self


class FaultsConfig(_Section):
    events: list[FaultSpec] = []
    """Faults to inject, each once at its round (empty = off): for tests, and to rehearse failures
    on a real cluster, e.g. ``--set 'faults.events=[{kind: generator, round: 3}]'``."""

"""The DPO β of each round: a fixed number or a schedule. Pure: no torch, no Ray, no I/O.

``learner.beta`` is a number, or one of three schedules (the models below, validated with the
config):

- ``{schedule: linear, start, end, rounds}``: from ``start`` at round 1 to ``end`` at round
  ``rounds``, then ``end``.
- ``{schedule: steps, values: {round: value}}``: each key is the first round at which its value
  holds.
- ``{schedule: kl_target, start, target_kl, rate}``: adaptive. After each round that trained, β
  is multiplied by ``1 + rate * e`` with ``e = clip(kl / target_kl - 1, -1, 1)``: raised when the
  round's KL estimate exceeded the target (the policy moved too far from the reference), lowered
  when it stayed below, and kept within ``[min_beta, max_beta]``. The proportional, clipped step
  is the adaptive KL controller of Ziegler et al. 2019 (fine-tuning LMs from human preferences),
  applied to β instead of a KL penalty coefficient.

``beta_for_round(spec, round, carried)`` is the β of a round; ``carry_beta(spec, used, kl)`` is
what a round hands to the next (only the adaptive schedule carries a value; the loop keeps it in
``LoopState.beta`` and the checkpoint's loop state, so a resumed run continues from it). Linear
and steps schedules depend on the round number alone.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class LinearBeta(_Schedule):
    schedule: Literal["linear"]
    """``linear``: β moves in a straight line from ``start`` (round 1) to ``end`` (round ``rounds``), then stays at ``end``."""
    start: float = Field(gt=0)
    """β of round 1."""
    end: float = Field(gt=0)
    """β from round ``rounds`` on."""
    rounds: int = Field(ge=2)
    """The round at which β reaches ``end``."""


class StepsBeta(_Schedule):
    schedule: Literal["steps"]
    """``steps``: piecewise constant."""
    values: dict[int, Annotated[float, Field(gt=0)]]
    """``{round: β}``: each key is the first round at which its value holds; one key must be 0 or 1."""

    @field_validator("values")
    @classmethod
    def _covers_round_one(cls, values: dict[int, float]) -> dict[int, float]:
        if not values:
            raise ValueError("needs at least one {round: beta} entry")
        if min(values) < 0:
            raise ValueError(f"rounds must be >= 0, got {min(values)}")
        if min(values) > 1:
            raise ValueError(f"needs a value for round 0 or 1 (the first key is {min(values)})")
        return values


class KLTargetBeta(_Schedule):
    schedule: Literal["kl_target"]
    """``kl_target``: adaptive, steered by each round's KL estimate (the ``kl`` metric)."""
    start: float = Field(gt=0)
    """β of round 1."""
    target_kl: float = Field(gt=0)
    """The KL estimate (nats per chosen answer, the ``kl`` metric) to hold."""
    rate: float = Field(0.1, gt=0, le=1)
    """Largest relative change of β per round (0.1 = ±10 %)."""
    min_beta: float | None = Field(None, gt=0)
    """Lower bound of β (none = ``start`` / 10)."""
    max_beta: float | None = Field(None, gt=0)
    """Upper bound of β (none = ``start`` × 10)."""

    @property
    def bounds(self) -> tuple[float, float]:
        low = self.min_beta if self.min_beta is not None else self.start / 10
        high = self.max_beta if self.max_beta is not None else self.start * 10
        return low, high

    @model_validator(mode="after")
    def _start_within_bounds(self) -> "KLTargetBeta":
        low, high = self.bounds
        if not low <= self.start <= high:
            raise ValueError(f"start: {self.start} is outside [min_beta, max_beta] = [{low}, {high}]")
        return self


def _kind(value: Any) -> str | None:
    """The union branch of a ``learner.beta`` value: ``number`` or the schedule's name."""
    if isinstance(value, BaseModel):
        return getattr(value, "schedule", None)
    if isinstance(value, dict):
        kind = value.get("schedule")
        return kind if kind in ("linear", "steps", "kl_target") else None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return "number"
    return None


BetaSpec = Annotated[
    Union[
        Annotated[float, Tag("number")],
        Annotated[LinearBeta, Tag("linear")],
        Annotated[StepsBeta, Tag("steps")],
        Annotated[KLTargetBeta, Tag("kl_target")],
    ],
    Discriminator(
        _kind, custom_error_type="beta_schedule",
        custom_error_message="must be a number or a schedule with 'schedule' one of linear, steps, kl_target",
    ),
]
"""The type of ``learner.beta``; errors name the bad field, e.g. ``learner.beta.linear.end: required``."""

Schedule = Union[float, LinearBeta, StepsBeta, KLTargetBeta]


def beta_for_round(spec: Schedule, round_: int, carried: float | None = None) -> float:
    """β of round ``round_`` (rounds count from 1; 0 and below read as 1); ``carried`` is the
    adaptive schedule's value handed on by the previous round (None: start afresh)."""
    r = max(1, round_)
    if isinstance(spec, LinearBeta):
        frac = min(1.0, (r - 1) / (spec.rounds - 1))
        return spec.start + (spec.end - spec.start) * frac
    if isinstance(spec, StepsBeta):
        return spec.values[max(k for k in spec.values if k <= r)]
    if isinstance(spec, KLTargetBeta):
        return carried if carried is not None else spec.start
    return float(spec)


def carry_beta(spec: Schedule, used: float, kl: float | None) -> float | None:
    """What a finished round hands to the next: the adaptive schedule's next β, else None. A
    round without a KL estimate (no pairs, or NaN) leaves β unchanged."""
    if not isinstance(spec, KLTargetBeta):
        return None
    if kl is None or not math.isfinite(kl):
        return used
    error = min(1.0, max(-1.0, kl / spec.target_kl - 1.0))
    low, high = spec.bounds
    return min(high, max(low, used * (1.0 + spec.rate * error)))


def describe(spec: Schedule) -> str:
    """One line for the log: ``0.1`` or ``linear 0.1 -> 0.02 over 100 rounds``."""
    if isinstance(spec, LinearBeta):
        return f"linear {spec.start:g} -> {spec.end:g} at round {spec.rounds}"
    if isinstance(spec, StepsBeta):
        return "steps " + ", ".join(f"{v:g} from round {k}" for k, v in sorted(spec.values.items()))
    if isinstance(spec, KLTargetBeta):
        low, high = spec.bounds
        return f"kl_target {spec.start:g} toward KL {spec.target_kl:g} (rate {spec.rate:g}, within [{low:g}, {high:g}])"
    return f"{float(spec):g}"

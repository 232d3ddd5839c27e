"""The learning rate of each round: ``learner.lr`` times a factor that depends on the round alone.

``learner.lr_schedule``:

- ``constant`` (default): the factor is 1.
- ``linear``: from 1 at round 1 down to ``min_lr_ratio`` at round ``lr_decay_rounds``, then
  ``min_lr_ratio``.
- ``cosine``: the same ends, along half a cosine (slow at first and last, fastest halfway).

The factor is set at the start of each ``train`` call and multiplies the step-based warmup
(``warmup_steps``). It is keyed to the round rather than the optimizer step because the steps of a
round depend on how many pairs it made; being a function of the round number alone, a resumed
run continues it exactly without any saved state. Pure: no torch, no I/O.
"""

from __future__ import annotations

import math


def lr_factor(schedule: str, round_: int, decay_rounds: int, min_ratio: float) -> float:
    """The multiplier of ``learner.lr`` in round ``round_`` (rounds count from 1; 0 and below read as 1)."""
    if schedule == "constant":
        return 1.0
    if decay_rounds < 2:
        raise ValueError(f"learner.lr_decay_rounds: must be >= 2 for lr_schedule {schedule!r}, got {decay_rounds}")
    t = min(1.0, (max(1, round_) - 1) / (decay_rounds - 1))
    if schedule == "linear":
        shape = 1.0 - t
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"learner.lr_schedule: must be constant, linear or cosine, got {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * shape

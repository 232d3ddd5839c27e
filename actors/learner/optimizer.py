"""The learner's optimizer: AdamW, and its learning rate per step and per round.

The rate of a step is ``learner.lr`` × the warmup factor of the step (``warmup_steps``) × the
factor of the round (``learner.lr_schedule``):

- ``constant`` (default): the factor is 1.
- ``linear``: from 1 at round 1 down to ``min_lr_ratio`` at round ``lr_decay_rounds``, then
  ``min_lr_ratio``.
- ``cosine``: the same ends, along half a cosine (slow at first and last, fastest halfway).

The factor is set at the start of each ``train`` call and multiplies the step-based warmup
(``warmup_steps``). It is keyed to the round rather than the optimizer step because the steps of a
round depend on how many pairs it made; being a function of the round number alone, a resumed
run continues it exactly without any saved state (``lr_factor`` is pure).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch


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


def refresh_due(every: int, refreshed_through: int | None, round_: int) -> tuple[bool, int | None]:
    """Whether round ``round_``'s training ends with a reference refresh (``ref_refresh_every``:
    the first training on or after each multiple of ``every``; a scheduled round without pairs,
    which trains nothing, moves its refresh to the next round that trains, not a whole period
    later), and the last scheduled round whose refresh is then done (None: fresh, or a checkpoint
    that did not record it)."""
    if every <= 0:
        return False, refreshed_through
    if refreshed_through is None:
        refreshed_through = (round_ - 1) // every * every
    due = round_ // every * every
    return (True, due) if due > refreshed_through else (False, refreshed_through)


class RoundSchedule:
    """AdamW over ``params`` with the step warmup and the round factor (``optimizer`` and
    ``scheduler`` are the torch objects a checkpoint saves and loads)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], cfg: Any):
        self.cfg = cfg
        self.params = list(params)
        """The trained parameters (all of the policy's; with LoRA, its adapters')."""
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        self.round_factor = 1.0
        """The round's factor of ``learner.lr`` (``lr_schedule``), set by ``set_round``."""
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0) * self.round_factor)

    def set_round(self, round_: int) -> None:
        """Apply ``lr_schedule``'s factor for ``round_`` to the next step's learning rate."""
        cfg = self.cfg
        self.round_factor = lr_factor(cfg.lr_schedule, round_, cfg.lr_decay_rounds, cfg.min_lr_ratio)
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * fn(self.scheduler.last_epoch)

    def apply_config(self) -> None:
        """Follow ``learner.lr``, ``weight_decay`` and ``betas`` as configured now: a checkpoint
        brings back its own in the param groups and the scheduler, and a resume with
        ``--allow-config-change`` must train with the new ones from its first round."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group.update(weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), initial_lr=cfg.lr)
        self.scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)

"""The learner's rehearsed failure (``faults.events`` ``{kind: learner, action: raise}``): a
``train`` call that raises after a given number of optimizer steps, on every rank.

Hooked onto the optimizer (``register_step_pre_hook`` / ``register_step_post_hook``), so the
learner's own round loop is untouched: the raise comes out of the K+1-th ``optimizer.step``
before it changes anything (or out of the end of ``train`` when the round has at most K steps),
exactly where an out-of-memory error on a later micro-batch would leave a half-trained round.
"""

from __future__ import annotations

import contextlib


class InjectedLearnerFault(RuntimeError):
    """Raised by a learner rank on purpose (fault injection)."""


@contextlib.contextmanager
def raise_after_steps(optimizer, after_steps: int | None):
    """Within the block, the optimizer raises instead of taking step ``after_steps + 1``; if the
    block ends with no more than ``after_steps`` steps taken, it raises on exit. ``None``: no fault."""
    if after_steps is None:
        yield
        return
    taken = [0]

    def count(*_args, **_kwargs):
        taken[0] += 1

    def refuse(*_args, **_kwargs):
        if taken[0] >= after_steps:
            raise InjectedLearnerFault(f"injected learner fault after {taken[0]} optimizer steps (faults.events)")

    handles = [optimizer.register_step_pre_hook(refuse), optimizer.register_step_post_hook(count)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    raise InjectedLearnerFault(f"injected learner fault after {taken[0]} optimizer steps (faults.events)")

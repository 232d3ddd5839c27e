"""The evaluation gate (``loop.gate``): after each round that has the gate's metric (by default
each eval round), compare it with the best value so far; ``patience`` drops in a row of more than
``max_drop`` below the best make a rollback due to the best round.

``gate_step`` is the decision, pure: the loop keeps its result in the round's state (committed
with the round, in the checkpoint's loop state), and the rollback itself happens at the start of
the next round (``orchestrator/service/hooks.py``): the learner loads the best round's
checkpoint (policy, reference, optimizer), ``learner.lr`` is multiplied by ``lr_backoff``, the
generators get the restored weights under a new policy version, and a checkpoint of the restored
state replaces the last round's. The best round's checkpoint is never pruned.
"""

from __future__ import annotations

import math
from typing import Any

FRESH = {"best_round": None, "best": None, "last": None, "below": 0, "rollbacks": 0, "rollback_due": None}


def gate_step(cfg: Any, previous: dict | None, round_: int, value: float | None) -> dict:
    """The gate's state after round ``round_`` whose metric is ``value`` (None: not measured)."""
    state = {**FRESH, **(previous or {})}
    if value is None or not math.isfinite(value):
        return state
    state["last"] = value
    if state["best"] is None or value > state["best"]:
        state.update(best_round=round_, best=value, below=0)
    elif value < state["best"] - cfg.max_drop:
        state["below"] += 1
        if state["below"] >= cfg.patience:
            state.update(rollback_due=state["best_round"], below=0)
    else:
        state["below"] = 0
    return state


def rolled_back(state: dict) -> dict:
    """The gate's state once its due rollback is done."""
    return {**state, "rollback_due": None, "below": 0, "rollbacks": state.get("rollbacks", 0) + 1}


def describe_rollback(cfg: Any, state: dict, round_: int, value: float | None, old_lr: float, new_lr: float) -> str:
    """The log line of a rollback."""
    shown = "-" if value is None else f"{value:.4f}"
    return (f"gate: {cfg.metric} {shown} at round {round_} fell more than {cfg.max_drop:g} below the best "
            f"{state['best']:.4f} (round {state['best_round']}) {cfg.patience} time(s) in a row: rolled back to "
            f"round {state['best_round']}'s checkpoint (policy, reference, optimizer, generators); "
            f"learner.lr {old_lr:g} -> {new_lr:g}; rollback {state.get('rollbacks', 0) + 1}")

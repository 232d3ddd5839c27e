"""Pairwise judges: a round-robin tournament turns ``compare(item, a, b)`` into scores.

Every pair of a prompt's completions is compared once (both orders when the judge sets
``compare_both_orders = True``, which cancels a judge's preference for the first or second
position); a completion's score is its share of decided comparisons won, in [0, 1]. A
comparison that answers ``None`` or raises is undecided; a completion with no decided comparison
scores ``None``. If every comparison of an item raises, the first error is raised, so the judge
actors count it like a failing ``score``.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

from judges.awaiting import run_sync
from judges.base import JudgeItem


def win_rates(n: int, outcomes: list[tuple[int, int, int | None]]) -> list[float | None]:
    """Share of decided games won by each of ``n`` players; ``outcomes`` holds ``(a, b, result)``
    with result 0 (a won), 1 (b won) or None (undecided)."""
    wins, played = [0] * n, [0] * n
    for a, b, result in outcomes:
        if result is None:
            continue
        wins[a if result == 0 else b] += 1
        played[a] += 1
        played[b] += 1
    return [wins[i] / played[i] if played[i] else None for i in range(n)]


def tournament_scores(judge: Any, item: JudgeItem) -> list[float | None]:
    """Round-robin scores of ``item``'s completions under ``judge.compare`` (sync or async)."""
    name = type(judge).__name__
    n = len(item.completions)
    orders = []
    for a, b in combinations(range(n), 2):
        orders.append((a, b))
        if getattr(judge, "compare_both_orders", False):
            orders.append((b, a))
    outcomes: list[tuple[int, int, int | None]] = []
    first_error: Exception | None = None
    for a, b in orders:
        try:
            result = run_sync(judge.compare(item, a, b))
        except Exception as e:  # one failed comparison leaves that game undecided
            first_error = first_error or e
            continue
        if result is not None and (isinstance(result, bool) or result not in (0, 1)):
            raise ValueError(f"{name}.compare returned {result!r}; expected 0, 1 or None")
        outcomes.append((a, b, result))
    if orders and not outcomes and first_error is not None:
        raise first_error
    return win_rates(n, outcomes)

"""Calling a judge so that one bad completion costs only itself.

``call_score`` runs a judge's ``score`` (sync or async) or, for a pairwise judge, a tournament
over ``compare``. ``score_guarded`` adds the checks: a batch that raises or comes back in the
wrong shape is retried item by item, an item that raises is retried completion by completion,
and every returned value is validated (``None``, NaN, inf and non-numbers become ``None``).
Lost completions are counted by kind. Pure Python: used inside the judge actors
(``actors/judging/host.py``), in the driver for self-rewarding judges, and by the ensemble judge.
``correct_guarded`` does the same for a corrector (``judges.correction``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from judges.awaiting import run_sync
from judges.base import JudgeItem
from judges.tournament import tournament_scores

MAX_ERRORS = 20
"""Distinct error messages kept per call: enough to diagnose, bounded for a flood."""


def call_score(judge: Any, items: list[JudgeItem]) -> Any:
    """The judge's raw answer for ``items``: ``score`` if it has one, else a ``compare`` tournament."""
    if callable(getattr(judge, "score", None)):
        return run_sync(judge.score(items))
    return [tournament_scores(judge, item) for item in items]


class WrongShape(ValueError):
    """A judge returned a list that does not have one score per completion."""


def check_shape(out: Any, items: list[JudgeItem], name: str, method: str = "score") -> list[list[Any]]:
    """``out`` as a list of per-item lists with one entry per completion, or ``WrongShape``."""
    what = "scores" if method == "score" else "entries"
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise WrongShape(f"{name}.{method} returned {type(out).__name__}, expected a list of lists")
    out = list(out)
    if len(out) != len(items):
        raise WrongShape(f"{name}.{method} returned {len(out)} lists for {len(items)} items")
    rows = []
    for i, (row, item) in enumerate(zip(out, items)):
        if isinstance(row, (str, bytes, dict)) or not hasattr(row, "__len__"):
            raise WrongShape(f"{name}.{method}: item {i}: got {type(row).__name__}, expected a list of {what}")
        row = list(row)
        if len(row) != len(item.completions):
            raise WrongShape(f"{name}.{method}: item {i}: {len(row)} {what} for {len(item.completions)} completions")
        rows.append(row)
    return rows


def to_score(value: Any) -> tuple[float | None, str | None]:
    """A judge's value as ``(score, None)``, or ``(None, kind)`` with kind none, not_a_number, nan or inf."""
    if value is None:
        return None, "none"
    if isinstance(value, (str, bytes)):
        return None, "not_a_number"  # "3" is a bug in the judge, not a score
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None, "not_a_number"
    if math.isnan(x):
        return None, "nan"
    if math.isinf(x):
        return None, "inf"
    return x, None


def validate_scores(raw: list[list[Any]], failures: Counter) -> list[list[float | None]]:
    out = []
    for row in raw:
        scores = []
        for value in row:
            x, kind = to_score(value)
            if kind:
                failures[kind] += 1
            scores.append(x)
        out.append(scores)
    return out


def _attempt(judge: Any, items: list[JudgeItem], name: str) -> tuple[list[list[Any]] | None, str | None, str]:
    """One call: (raw rows, None, "") or (None, kind, message)."""
    try:
        return check_shape(call_score(judge, items), items, name), None, ""
    except WrongShape as e:
        return None, "wrong_shape", f"{e} (wrong_shape)"
    except Exception as e:  # a user's judge can fail in any way; only its completions are lost
        text = str(e).splitlines()[0][:200] if str(e) else ""
        return None, "raised", f"{name}.score raised {type(e).__name__}: {text}"


def score_guarded(judge: Any, items: list[JudgeItem]) -> tuple[list[list[float | None]], dict[str, int], list[str]]:
    """Score ``items`` with retries; returns (scores, lost completions by kind, error messages).

    A failed batch is retried per item; a per-item call that raises is retried per completion
    (an item holding that one completion); a per-item call that is still the wrong shape loses
    that item's completions. Counts are in completions.
    """
    name = type(judge).__name__
    failures: Counter = Counter()
    errors: list[str] = []

    def note(message: str) -> None:
        if message not in errors and len(errors) < MAX_ERRORS:
            errors.append(message)

    raw, kind, message = _attempt(judge, items, name)
    if kind is None:
        return validate_scores(raw, failures), dict(failures), errors
    note(message)
    scores: list[list[float | None]] = []
    for item in items:
        if len(items) > 1:
            raw, kind, message = _attempt(judge, [item], name)
        if kind is None:
            scores.append(validate_scores(raw, failures)[0])
            continue
        note(message)
        if kind == "wrong_shape" or len(item.completions) <= 1:
            failures[kind] += len(item.completions)
            scores.append([None] * len(item.completions))
            continue
        row: list[float | None] = []
        for completion in item.completions:
            single = JudgeItem(prompt=item.prompt, completions=[completion], row=item.row)
            raw1, kind1, message1 = _attempt(judge, [single], name)
            if kind1 is None:
                row.append(validate_scores(raw1, failures)[0][0])
            else:
                note(message1)
                failures[kind1] += 1
                row.append(None)
        scores.append(row)
    return scores, dict(failures), errors


def correct_guarded(corrector: Any, items: list[JudgeItem]) -> tuple[list[list[str | None]], dict[str, int], list[str]]:
    """A corrector's texts for ``items`` (one per completion, None = no correction); returns
    (corrections, completions left uncorrected by failure kind, error messages).

    A batch that raises or comes back in the wrong shape is retried item by item; an item that
    still fails is left uncorrected (counted per completion as ``raised`` / ``wrong_shape``). An
    entry that is neither text nor None counts as ``not_text``.
    """
    name = type(corrector).__name__
    failures: Counter = Counter()
    errors: list[str] = []

    def attempt(batch: list[JudgeItem]) -> list[list[Any]] | None:
        try:
            return check_shape(run_sync(corrector.correct(batch)), batch, name, "correct")
        except WrongShape as e:
            kind, message = "wrong_shape", f"{e} (wrong_shape)"
        except Exception as e:  # a user's corrector can fail in any way; only its items are lost
            kind, message = "raised", f"{name}.correct raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if message not in errors and len(errors) < MAX_ERRORS:
            errors.append(message)
        if len(batch) == 1:
            failures[kind] += len(batch[0].completions)
        return None

    raw = attempt(items)
    if raw is None:
        raw = []
        for item in items:
            one = attempt([item]) if len(items) > 1 else None
            raw.append(one[0] if one is not None else [None] * len(item.completions))
    out = []
    for row in raw:
        texts = []
        for value in row:
            if value is not None and not isinstance(value, str):
                failures["not_text"] += 1
                value = None
            texts.append(value)
        out.append(texts)
    return out, dict(failures), errors


def pop_judge_failures(judge: Any) -> dict[str, int]:
    """The judge's own failure counts (``pop_failures`` hook), keyed ``judge.<kind>``; never raises."""
    pop = getattr(judge, "pop_failures", None)
    if not callable(pop):
        return {}
    try:
        counts = pop() or {}
        return {f"judge.{k}": int(v) for k, v in dict(counts).items() if int(v)}
    except Exception:  # a broken hook must not cost the scores
        return {"judge.pop_failures_raised": 1}

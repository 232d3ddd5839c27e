"""A weighted sum of other judges.

``EnsembleJudge(judges=[{"cls": "judges.verifiable:VerifiableJudge", "kwargs": {...}, "weight": 1.0},
...])``: each member is named and checked like a top-level judge (its path and kwargs are checked
when the config loads, with errors naming ``judge.kwargs.judges[i]``), built in ``setup`` and
called in turn (sync, async or pairwise). A completion's score is ``sum(weight_i * score_i)``;
it is ``None`` when any member cannot score it (a missing term would silently shift the scale
between completions of one prompt, which is exactly what pair selection compares). A member that
raises or returns the wrong shape makes the ensemble raise, so the judge actors retry per item
and per completion as for any judge. Members' own failure counts are passed on.
"""

from __future__ import annotations

from typing import Any

from judges.base import Judge, JudgeItem
from judges.calling import call_score, check_shape, to_score
from judges.loader import JudgeSpecError, check_judge_spec

_MEMBER_KEYS = {"cls", "kwargs", "weight"}


def _members(judges: Any, field: str = "judge.kwargs.judges") -> list[tuple[str, dict, float]]:
    """Validated ``(cls, kwargs, weight)`` per member; errors name ``judges[i]``."""
    if not isinstance(judges, list) or not judges:
        raise JudgeSpecError(f"{field}: must be a non-empty list of {{cls, kwargs, weight}}")
    out = []
    for i, spec in enumerate(judges):
        where = f"{field}[{i}]"
        if not isinstance(spec, dict) or "cls" not in spec:
            raise JudgeSpecError(f"{where}: must be a mapping with cls (and optional kwargs, weight)")
        unknown = sorted(set(spec) - _MEMBER_KEYS)
        if unknown:
            raise JudgeSpecError(f"{where}.{unknown[0]}: unknown key (a member has cls, kwargs, weight)")
        kwargs = spec.get("kwargs") or {}
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise JudgeSpecError(f"{where}.weight: must be a number, got {weight!r}")
        check_judge_spec(spec["cls"], kwargs, field=f"{where}.cls")
        out.append((spec["cls"], dict(kwargs), float(weight)))
    return out


class EnsembleJudge(Judge):
    def __init__(self, judges: list[dict[str, Any]]):
        self.specs = _members(judges)
        self.members: list[Any] = []

    @classmethod
    def check_kwargs(cls, kwargs: dict) -> None:
        _members(kwargs.get("judges"))

    def setup(self) -> None:
        if self.members:
            return
        for path, kwargs, _ in self.specs:
            member = check_judge_spec(path, kwargs)(**kwargs)
            if callable(getattr(member, "setup", None)):
                member.setup()
            self.members.append(member)

    def close(self) -> None:
        for member in self.members:
            if callable(getattr(member, "close", None)):
                member.close()
        self.members = []

    def pop_failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for member in self.members:
            pop = getattr(member, "pop_failures", None)
            for kind, count in (pop() if callable(pop) else {}).items():
                key = f"{type(member).__name__}.{kind}"
                out[key] = out.get(key, 0) + count
        return out

    def score(self, items: list[JudgeItem]) -> list[list[float | None]]:
        if not self.members:
            self.setup()
        total: list[list[float | None]] = [[0.0] * len(item.completions) for item in items]
        for member, (_, _, weight) in zip(self.members, self.specs):
            rows = check_shape(call_score(member, items), items, type(member).__name__)
            for i, row in enumerate(rows):
                for j, value in enumerate(row):
                    x, _ = to_score(value)
                    if x is None or total[i][j] is None:
                        total[i][j] = None
                    else:
                        total[i][j] += weight * x
        return total

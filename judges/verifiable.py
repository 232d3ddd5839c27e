"""Verifiable rewards: compare each completion with the gold answer in the dataset row.

``VerifiableJudge(answer_field="answer", mode="number")`` scores 1.0 for a match and 0.0
otherwise; a row without a usable gold answer scores ``None`` (cannot score). Modes:

- ``number``: numeric equality after normalization: surrounding whitespace and ``$``, the last
  ``\\boxed{...}`` (nested braces allowed), ``\\frac{a}{b}``, thousands commas (``1,234``), a
  trailing period, a Unicode minus, ``+`` and leading zeros, equivalent numerals (``3.0`` ==
  ``3``, ``1/2`` == ``0.5`` == ``.5``, ``1e3`` == ``1000``). With ``strict`` (the default) the
  completion must state only the number (or box it); otherwise the last number in it counts.
  ``partial_credit`` is the score of a strict-mode miss whose last number is nevertheless right
  (e.g. ``"the sum is 43"``), so format and correctness can be rewarded apart.
- ``exact``: string equality after stripping (``ignore_case`` optional).
- ``regex``: ``pattern`` must match the whole stripped completion; ``{answer}`` in it is
  replaced by the escaped gold answer.
- ``places``: graded, the share of the gold answer's characters the stripped completion has in
  the same place, counted from the right with ``align="right"`` (the digits of a number: units
  under units) or from the left, over the longer of the two, so a missing or extra character
  costs its place: gold ``"1234"`` scores ``"1234"`` 1, ``"1294"`` 0.75, ``"234"`` 0.75,
  ``"11234"`` 0.8, ``"4321"`` 0.

The addition demo's reward uses ``number``; the graded demo's uses ``places``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal

from judges.base import Judge, JudgeItem

_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_DEC = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
# A sign only where it cannot be an operator between two numbers ("17+26" is not "+26").
_NUMBER = re.compile(rf"(?:(?<![\w.])[-+])?{_DEC}(?:[eE][-+]?\d+)?(?:\s*/\s*{_INT})?")
_FRAC = re.compile(r"\\[dt]?frac\{\s*([^{}]*?)\s*\}\{\s*([^{}]*?)\s*\}")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no boxed answer


def _clean(text: str) -> str:
    text = text.replace("\u2212", "-").strip()
    text = _FRAC.sub(r"\1/\2", text)
    return text.strip("$ \t\n").rstrip(".").strip()


def _to_fraction(token: str) -> Fraction | None:
    token = token.replace(",", "").replace(" ", "")
    num, _, den = token.partition("/")
    try:
        value = Fraction(num)
        return value / Fraction(den) if den else value
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(text: str) -> Fraction | None:
    """The number ``text`` states when it is exactly one number (after normalization), else None."""
    text = _clean(text)
    return _to_fraction(text) if _NUMBER.fullmatch(text) else None


def normalize_number(text: str) -> Fraction | None:
    """The number a free-form answer states: the last ``\\boxed{}`` if any, else its last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    found = _NUMBER.findall(_clean(text))
    return _to_fraction(found[-1]) if found else None


def place_credit(text: str, gold: str, right: bool = True, ignore_case: bool = False) -> float | None:
    """The share of places where ``text`` and ``gold`` (both stripped) have the same character,
    aligned at the right end (or the left), over the longer length; None for an empty gold."""
    a, b = text.strip(), gold.strip()
    if ignore_case:
        a, b = a.casefold(), b.casefold()
    if not b:
        return None
    if right:
        a, b = a[::-1], b[::-1]
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))


class VerifiableJudge(Judge):
    def __init__(
        self,
        answer_field: str = "answer",
        mode: Literal["number", "exact", "regex", "places"] = "number",
        pattern: str | None = None,
        strict: bool = True,
        partial_credit: float = 0.0,
        ignore_case: bool = False,
        align: Literal["right", "left"] = "right",
    ):
        """``strict`` (number mode): the completion must be only the number (or box it).
        ``partial_credit`` (number mode, strict): score of a right last number in the wrong form.
        ``ignore_case`` (exact, regex and places modes): compare case-insensitively.
        ``align`` (places mode): count places from the right (numbers) or the left."""
        if mode not in ("number", "exact", "regex", "places"):
            raise ValueError(f"mode must be number, exact, regex or places, got {mode!r}")
        if align not in ("right", "left"):
            raise ValueError(f"align must be right or left, got {align!r}")
        if mode == "regex":
            if not pattern:
                raise ValueError("mode 'regex' needs a pattern")
            try:
                re.compile(pattern.replace("{answer}", "x"))
            except re.error as e:
                raise ValueError(f"pattern {pattern!r} is not a valid regex: {e}") from None
        self.answer_field, self.mode, self.pattern, self.strict = answer_field, mode, pattern, strict
        self.partial_credit, self.ignore_case, self.align = float(partial_credit), ignore_case, align

    @classmethod
    def check_kwargs(cls, kwargs: dict) -> None:
        cls(**kwargs)  # construction is cheap and validates every argument

    def _score(self, text: str, gold: str) -> float | None:
        if self.mode == "exact":
            a, b = text.strip(), gold.strip()
            return float(a.casefold() == b.casefold() if self.ignore_case else a == b)
        if self.mode == "places":
            return place_credit(text, gold, right=self.align == "right", ignore_case=self.ignore_case)
        if self.mode == "regex":
            pat = self.pattern.replace("{answer}", re.escape(gold.strip()))
            flags = re.IGNORECASE if self.ignore_case else 0
            return float(re.fullmatch(pat, text.strip(), flags) is not None)
        want = normalize_number(gold)
        if want is None:
            return None  # the gold answer is not a number: a data problem, not a wrong answer
        boxed = last_boxed(text)
        if not self.strict:
            return float(normalize_number(text) == want)
        got = parse_number(boxed if boxed is not None else text)
        if got == want:
            return 1.0
        if self.partial_credit and normalize_number(text) == want:
            return self.partial_credit
        return 0.0

    def score(self, items: list[JudgeItem]) -> list[list[float | None]]:
        out = []
        for item in items:
            gold = item.row.get(self.answer_field)
            if gold is None:
                out.append([None] * len(item.completions))
                continue
            out.append([self._score(c.text, str(gold)) for c in item.completions])
        return out

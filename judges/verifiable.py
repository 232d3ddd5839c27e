"""Verifiable rewards: compare each completion with the gold answer in the dataset row.

``VerifiableJudge(answer_field="answer", mode="number")`` scores 1.0 for a match and 0.0
otherwise. Modes: ``number`` (numeric equality after normalization: whitespace, ``\\boxed{}``,
thousands commas, a trailing period, ``+``/leading zeros, ``3.0`` == ``3``), ``exact`` (string
equality after stripping), ``regex`` (``pattern`` must match the whole stripped completion, with
``{answer}`` substituted, escaped). The demo's reward uses ``number``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal

from judges.base import Judge, JudgeItem

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:/\d+)?")


def normalize_number(text: str) -> Fraction | None:
    """The number a short answer states, or None. Takes the last ``\\boxed{}`` if any, else the
    last number in the text."""
    text = text.strip()
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Fraction(found[-1])
    except (ValueError, ZeroDivisionError):
        return None


class VerifiableJudge(Judge):
    def __init__(
        self,
        answer_field: str = "answer",
        mode: Literal["number", "exact", "regex"] = "number",
        pattern: str | None = None,
        strict: bool = True,
    ):
        """``strict`` (number mode): the completion must be only the number, not text ending in it."""
        if mode not in ("number", "exact", "regex"):
            raise ValueError(f"mode must be number, exact or regex, got {mode!r}")
        if mode == "regex" and not pattern:
            raise ValueError("mode 'regex' needs a pattern")
        self.answer_field, self.mode, self.pattern, self.strict = answer_field, mode, pattern, strict

    def _match(self, text: str, gold: str) -> bool:
        if self.mode == "exact":
            return text.strip() == gold.strip()
        if self.mode == "regex":
            pat = self.pattern.replace("{answer}", re.escape(gold.strip()))
            return re.fullmatch(pat, text.strip()) is not None
        if self.strict and not _BOXED.search(text):
            body = text.strip().rstrip(".").replace(",", "")
            if not _NUMBER.fullmatch(body):
                return False
        got, want = normalize_number(text), normalize_number(gold)
        return got is not None and want is not None and got == want

    def score(self, items: list[JudgeItem]) -> list[list[float | None]]:
        out = []
        for item in items:
            gold = item.row.get(self.answer_field)
            if gold is None:
                out.append([None] * len(item.completions))
                continue
            out.append([float(self._match(c.text, str(gold))) for c in item.completions])
        return out

"""Correctors: improved versions of the policy's own answers, for correction pairs.

A correction pair takes a sampled answer as the *rejected* side and an improved version of it as
the *chosen* side: the way teams change a model's behaviour with small, targeted edits (its
identity, tone, a refusal, a fixed format). The chosen side was written, not sampled, so these
pairs are off-policy by design (``source: correction`` in the pairs file).

A corrector is a class named in config like a judge (``corrector.cls`` + ``corrector.kwargs``,
checked by ``judges.loader`` before any actor starts) with one method::

    class MyCorrector:
        def correct(self, items: list[JudgeItem]) -> list[list[str | None]]:
            ...   # for each item, for each sampled completion: an improved text, or None

``None`` (or the completion's own text) means "no correction". ``async def correct``,
``setup()``, ``close()`` and a ``check_kwargs(kwargs)`` classmethod work as for judges; the
corrector runs in the judge actors. ``judges.calling.correct_guarded`` calls it so that a failure
costs only the failing items.

Built-ins:

- ``GoldAnswerCorrector(answer_field="answer")``: the dataset's gold answer, for tasks that have
  one; an answer that already equals it (after stripping whitespace) is not corrected.
- ``ReplaceCorrector(replace={...}, regex=False, ignore_case=False)``: literal or regular
  expression replacements, applied in order (e.g. ``{"Llama": "Athene"}`` for an identity).
"""

from __future__ import annotations

import re

from judges.base import JudgeItem


class GoldAnswerCorrector:
    def __init__(self, answer_field: str = "answer"):
        self.answer_field = answer_field

    @classmethod
    def check_kwargs(cls, kwargs: dict) -> None:
        field = kwargs.get("answer_field", "answer")
        if not isinstance(field, str) or not field:
            raise ValueError(f"answer_field must be a column name, got {field!r}")

    def correct(self, items: list[JudgeItem]) -> list[list[str | None]]:
        out = []
        for item in items:
            if self.answer_field not in item.row:
                raise KeyError(f"the row has no column {self.answer_field!r} (corrector.kwargs.answer_field); "
                               f"it has {sorted(item.row)}")
            gold = item.row[self.answer_field]
            if gold is None:
                out.append([None] * len(item.completions))
                continue
            gold = str(gold)
            out.append([None if c.text.strip() == gold.strip() else gold for c in item.completions])
        return out


class ReplaceCorrector:
    def __init__(self, replace: dict[str, str], regex: bool = False, ignore_case: bool = False):
        self.replace = dict(replace)
        flags = re.IGNORECASE if ignore_case else 0
        self.rules = [(re.compile(p if regex else re.escape(p), flags), r if regex else r.replace("\\", "\\\\"))
                      for p, r in self.replace.items()]

    @classmethod
    def check_kwargs(cls, kwargs: dict) -> None:
        replace = kwargs.get("replace")
        if not isinstance(replace, dict) or not replace:
            raise ValueError("replace must be a non-empty mapping {pattern: replacement}")
        for pattern, replacement in replace.items():
            if not isinstance(pattern, str) or not pattern or not isinstance(replacement, str):
                raise ValueError(f"replace: {pattern!r}: patterns must be non-empty strings and replacements strings")
            if kwargs.get("regex"):
                try:
                    re.compile(pattern).sub(replacement, "")
                except re.error as e:
                    raise ValueError(f"replace: {pattern!r} -> {replacement!r}: {e}") from None

    def correct(self, items: list[JudgeItem]) -> list[list[str | None]]:
        out = []
        for item in items:
            row = []
            for c in item.completions:
                text = c.text
                for pattern, replacement in self.rules:
                    text = pattern.sub(replacement, text)
                row.append(text if text != c.text else None)
            out.append(row)
        return out

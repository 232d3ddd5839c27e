"""The judge protocol: what a user writes to tell odpo which answer is better.

A judge is a class, named in config as ``package.module:ClassName`` and built with
``judge.kwargs``. Its one required method scores a batch::

    class MyJudge:
        def score(self, items: list[JudgeItem]) -> list[list[float | None]]:
            return [[len(c.text) for c in item.completions] for item in items]

``score`` returns one list per item with one score per completion; ``None`` (or NaN) means
"cannot score this one" and removes only that completion. ``async def score`` works too.
Optional: ``setup()`` (called once in the judge actor before the first batch, e.g. to load a
model) and ``close()``.

The second shape is pairwise: ``compare(item, a, b) -> 0 | 1 | None`` says which of the
completions at indices ``a`` and ``b`` is better (0 = a, 1 = b, None = cannot tell); a
round-robin tournament (``judges.tournament``) turns the wins into scores. A judge with both
methods is called through ``score``.

Further optional hooks, all looked up by name (no base class needed):

- ``check_kwargs(kwargs)`` (classmethod): called when the config loads, before any actor starts;
  raise ``ValueError`` to reject the arguments (the built-in judges construct themselves here,
  which is cheap because models load in ``setup``).
- ``pop_failures() -> dict[str, int]``: counts of the judge's own failures since the last call
  (e.g. HTTP timeouts); the judge actors report them as ``judge.<kind>``.
- ``runs_in_driver(kwargs) -> bool`` (staticmethod) and ``bind_generate(fn)``: a judge that needs
  the policy's own generators (self-rewarding) is hosted in the driver and handed
  ``fn(prompts, n, temperature, max_tokens) -> list[list[str]]`` before ``setup``.

``Prompt``, ``Completion`` and ``JudgeItem`` live in ``common.types`` (the data every stage passes)
and are importable from here, the plug-in API. Scores are validated by the judge actors, not here: NaN, inf and non-numbers become ``None``
and are counted, so a buggy judge costs completions, never the loop.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from common.types import Completion, JudgeItem, Prompt

__all__ = ["Completion", "JudgeItem", "Prompt", "Judge", "ScoringJudge", "PairwiseJudge", "prompt_text"]


@runtime_checkable
class ScoringJudge(Protocol):
    def score(self, items: list[JudgeItem]) -> list[list[float | None]]: ...


@runtime_checkable
class PairwiseJudge(Protocol):
    def compare(self, item: JudgeItem, a: int, b: int) -> int | None: ...


class Judge:
    """Optional base class: gives no-op ``setup``/``close``. Subclasses define ``score``."""

    def setup(self) -> None:
        pass

    def close(self) -> None:
        pass


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: chat messages are joined as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)

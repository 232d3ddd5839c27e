"""``JudgeHost``: one instance of the user's judge (and corrector, when configured), built, seeded
and set up once, that scores (and corrects) chunks of a round with the guards of
``judges.calling``: a failing batch is retried per item and per completion, so only the failing
completions are lost. It runs as a Ray actor, or in the driver for self-rewarding judges, which
reach the policy's generators only through a ``GenerateGate``. ``actors.judging.pool`` drives them.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from typing import Callable

from judges.base import JudgeItem
from judges.calling import call_score, correct_guarded, pop_judge_failures, score_guarded
from judges.loader import check_judge_spec


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


class JudgeHost:
    """One judge instance: built, seeded and set up once; scores chunks with ``score_guarded``.
    Runs as a Ray actor (``ray.remote(JudgeHost)``) or, for self-rewarding judges, in the driver."""

    def __init__(self, cls_path: str, kwargs: dict, seed: int, generate_fn: Callable | None = None,
                 corrector: tuple[str, dict] | None = None):
        _seed_everything(seed)
        self.judge = check_judge_spec(cls_path, kwargs)(**kwargs)
        self.name = type(self.judge).__name__
        if generate_fn is not None:
            self.judge.bind_generate(generate_fn)
        if callable(getattr(self.judge, "setup", None)):
            self.judge.setup()
        self.corrector = None
        if corrector is not None:
            c_path, c_kwargs = corrector
            self.corrector = check_judge_spec(c_path, c_kwargs, "corrector.cls", ("correct",))(**c_kwargs)
            if callable(getattr(self.corrector, "setup", None)):
                self.corrector.setup()

    def ready(self) -> str:
        return self.name

    def score(self, items: list[JudgeItem], correct: bool = False) -> tuple[list[list], dict[str, int], list[str]]:
        """Scores for every completion of ``items``, each paired with the corrector's text when
        ``correct``: rows of ``(score, correction)``; failures by kind (the corrector's prefixed
        ``corrector.``) and messages. The judge phase's one call per chunk."""
        judge = self.judge
        if getattr(self, "fault_raise_calls", 0):  # fault injection (orchestrator/loop/faults.py)
            judge, self.fault_raise_calls = _Raising(judge, self.fault_raise_calls), 0
        scores, failures, errors = score_guarded(judge, items)
        failures = {**failures, **pop_judge_failures(self.judge)}
        fixes = [[None] * len(item.completions) for item in items]
        if correct:
            if self.corrector is None:
                raise RuntimeError("this judge actor hosts no corrector (corrector.cls is not set)")
            fixes, c_failures, c_errors = correct_guarded(self.corrector, items)
            failures.update({f"corrector.{k}": v for k, v in c_failures.items()})
            errors = errors + c_errors
        rows = [list(zip(s_row, f_row)) for s_row, f_row in zip(scores, fixes)]
        return rows, failures, errors

    def close(self) -> None:
        for part in (self.judge, self.corrector):
            if callable(getattr(part, "close", None)):
                part.close()


class _Raising:
    """A judge whose first ``calls`` score calls raise (a rehearsed judge failure)."""

    def __init__(self, judge, calls: int):
        self._judge, self._left = judge, calls

    def __getattr__(self, name):
        return getattr(self._judge, name)

    def score(self, items):
        if self._left > 0:
            self._left -= 1
            raise RuntimeError("injected judge fault (faults.events)")
        return call_score(self._judge, items)


class GenerateGate:
    """A self-rewarding judge's only way to the policy's generators: ``gate(*args)`` calls
    ``generate_fn`` under a lock, and raises ``TimeoutError`` instead once ``deadline``
    (``time.monotonic()``) has passed or the gate is closed."""

    def __init__(self, generate_fn: Callable):
        self._fn, self._lock = generate_fn, threading.Lock()
        self._closed = False
        self.deadline: float | None = None

    def __call__(self, *args, **kwargs):
        with self._lock:
            if self._closed or (self.deadline is not None and time.monotonic() > self.deadline):
                raise TimeoutError("self-rewarding judge: generate called past its deadline (judge.timeout_s); "
                                   "the generators were not touched")
            return self._fn(*args, **kwargs)

    def close(self) -> None:
        """Refuse every later call; returns once a call already inside ``generate_fn`` has ended."""
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

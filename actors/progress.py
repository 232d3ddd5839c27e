"""Progress inside a call, reported from actors to the driver while the call runs.

An actor busy in ``sample`` or ``train`` cannot answer questions, so it pushes instead: each
report is a fire-and-forget call to one small ``ProgressBoard`` actor, named per Ray job, that
the driver creates and reads (``orchestrator.observe.progress``). A report is ``(kind, index, tag,
done, total)``: ``kind`` is ``sample`` or ``learn``, ``index`` the actor, ``tag`` names the call
(the sampling seed, the learner's round) so that the driver never mistakes the end of the last
call for the start of this one. Reports are throttled (at most ``MIN_INTERVAL_S`` apart, plus
the last one of a call); without a board (tests, plain construction) reporting is a no-op.
"""

from __future__ import annotations

import time
from typing import Any

BOARD_NAME = "odpo-progress"
MIN_INTERVAL_S = 0.25


class ProgressBoard:
    """The latest ``(tag, done, total)`` of every reporting actor. A Ray actor (zero CPUs)."""

    def __init__(self):
        self.entries: dict[str, tuple[Any, int, int]] = {}

    def update(self, key: str, tag: Any, done: int, total: int) -> None:
        self.entries[key] = (tag, done, total)

    def snapshot(self) -> dict[str, tuple[Any, int, int]]:
        return dict(self.entries)


_board: Any = None
_looked_up = False


def _find_board():
    """The job's board, looked up once per process (None when there is none)."""
    global _board, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            import ray

            _board = ray.get_actor(BOARD_NAME) if ray.is_initialized() else None
        except Exception:  # no board in this job: reporting is off
            _board = None
    return _board


class Reporter:
    """Reports one call's progress: ``Reporter("sample", 0, tag, total).advance()`` per item."""

    def __init__(self, kind: str, index: int, tag: Any, total: int):
        self.key, self.tag, self.total = f"{kind}:{index}", tag, total
        self.done, self._last = 0, 0.0
        self._send(force=True)

    def set(self, done: int) -> None:
        self.done = done
        self._send(force=done >= self.total)

    def advance(self, n: int = 1) -> None:
        self.set(self.done + n)

    def _send(self, force: bool) -> None:
        board = _find_board()
        now = time.monotonic()
        if board is None or (not force and now - self._last < MIN_INTERVAL_S):
            return
        self._last = now
        try:
            board.update.remote(self.key, self.tag, self.done, self.total)
        except Exception:  # progress must never fail the call it describes
            pass


class EngineCounter:
    """A stand-in for the tqdm bar that ``vllm.LLM.generate(use_tqdm=...)`` builds: it counts
    finished requests (one per prompt) into a ``Reporter`` instead of drawing."""

    def __init__(self, reporter: Reporter, total: int = 0, **_ignored):
        self.reporter, self.total, self.n = reporter, total, 0
        self.postfix = None
        self._t0 = time.perf_counter()

    @classmethod
    def factory(cls, kind: str, index: int, tag: Any, total: int):
        """The ``use_tqdm`` callable: vLLM calls it with an iterable to wrap (adding requests:
        passed through untouched) and without one for the bar of finished requests."""
        reporter = Reporter(kind, index, tag, total)

        def make(iterable=None, **kwargs):
            return iterable if iterable is not None else cls(reporter, **kwargs)

        return make

    @property
    def format_dict(self) -> dict:
        return {"elapsed": max(time.perf_counter() - self._t0, 1e-9)}

    def update(self, n: int = 1) -> None:
        self.n += n  # vLLM adds the request's sample count here; a call is one finished request
        self.reporter.advance(1)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self.reporter.set(self.reporter.total)

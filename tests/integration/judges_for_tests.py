"""Misbehaving judges for the judge-actor tests; importable by Ray workers from the repo root.

Completions are texts like ``"c7"``; the number is the completion's global position, so which
completions a judge fails on does not depend on how the pool chunks or retries the batch.
"""

import asyncio
import os
import time
from pathlib import Path


def number(text: str) -> int:
    return int(text.lstrip("c"))


class RaisesEveryThird:
    """Scores ``c<k>`` as k, but raises on any batch holding a completion with k % 3 == 2."""

    def score(self, items):
        nums = [[number(c.text) for c in it.completions] for it in items]
        bad = [k for row in nums for k in row if k % 3 == 2]
        if bad:
            raise ValueError(f"cannot score c{bad[0]}")
        return [[float(k) for k in row] for row in nums]


class WrongShape:
    """Returns one score too few for every item."""

    def score(self, items):
        return [[1.0] * (len(it.completions) - 1) for it in items]


class AsyncBadValues:
    """``async def score`` returning NaN, inf, text and numbers by position (k % 4)."""

    async def score(self, items):
        await asyncio.sleep(0)
        table = {0: float("nan"), 1: float("inf"), 2: "high", 3: 3.0}
        return [[table[number(c.text) % 4] for c in it.completions] for it in items]


class DiesOnce:
    """Kills its own process on the first call ever (a marker file remembers it), then scores k."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def score(self, items):
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return [[float(number(c.text)) for c in it.completions] for it in items]


class HangsOnce:
    """Sleeps far past any timeout on the first call ever, then scores k."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def score(self, items):
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)
        return [[float(number(c.text)) for c in it.completions] for it in items]


class PidJudge:
    """Scores every completion with the actor's process id (shows which actor scored what)."""

    def setup(self):
        self.pid = os.getpid()

    def score(self, items):
        return [[float(self.pid)] * len(it.completions) for it in items]


class SetupFails:
    def setup(self):
        raise RuntimeError("no reward model at /nowhere")

    def score(self, items):
        return [[0.0] * len(it.completions) for it in items]


class MarkerJudge:
    """Scores 1 for an answer holding ``marker`` and 0 otherwise: a judge with a shortcut, whose
    pairs teach the marker rather than the task (what ``odpo audit`` must catch)."""

    def __init__(self, marker: str = "7"):
        self.marker = marker

    def score(self, items):
        return [[float(self.marker in c.text) for c in it.completions] for it in items]

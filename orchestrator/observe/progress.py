"""Progress inside a round, for whoever watches it: ``/status``'s ``progress``, a tqdm bar in a
terminal, periodic plain lines in a job log.

``ProgressWatcher`` is one daemon thread in the driver. Every ``poll_s`` it looks at the phase the
loop is in (``Metrics.status()``) and asks what runs that phase how far it got:

- ``sample`` and ``eval``: the generators' reports on the job's ``ProgressBoard``
  (``actors/progress.py``): prompts their engines finished / prompts, for the call whose seed
  the round uses (so a self-rewarding judge's own sampling is not mistaken for the round's);
- ``judge``: the judge pool, prompts scored / prompts, as each actor's batch comes back;
- ``learn``: rank 0's reports, optimizer steps done / steps in the round.

The figure goes to ``/status`` as ``progress: {done, total, unit}`` of the current phase. When
stderr is a terminal a tqdm bar shows it; otherwise (a job log) one line per phase every
``log.progress_every_s`` seconds, the first after that long in the phase, so short phases stay
quiet.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from actors.generator.actor import progress_tag
from actors.progress import BOARD_NAME, ProgressBoard

log = logging.getLogger("odpo.progress")

UNITS = {"sample": "prompts", "eval": "prompts", "judge": "prompts", "learn": "steps"}


class ProgressWatcher:
    def __init__(self, metrics, judges, seed: int, every_s: float, tty: bool | None = None):
        import ray

        self.metrics, self.judges, self.seed, self.every_s = metrics, judges, seed, every_s
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.poll_s = min(1.0, every_s) if every_s else 1.0
        self.board = ray.remote(ProgressBoard).options(name=BOARD_NAME, num_cpus=0, get_if_exists=True).remote()
        self._stop = threading.Event()
        self._key: tuple | None = None
        self._since = self._last_line = 0.0
        self._bar = None
        self._thread = threading.Thread(target=self._run, name="odpo-progress", daemon=True)

    def start(self) -> "ProgressWatcher":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._close_bar()
        try:
            import ray

            ray.kill(self.board)
        except Exception:  # the cluster may be gone already
            pass

    # --- reading ---------------------------------------------------------------------------------
    def read(self, phase: str, round_: int) -> tuple[int, int] | None:
        """(done, total) of ``phase`` in ``round_``, or None when nothing has reported yet."""
        if phase == "judge":
            done, total = getattr(self.judges, "progress", (0, 0))
            return (done, total) if total else None
        wanted = self._wanted(phase, round_)
        if wanted is None:
            return None
        kind, tag = wanted
        import ray

        entries = ray.get(self.board.snapshot.remote(), timeout=5)
        mine = [(d, t) for key, (t_, d, t) in entries.items() if key.startswith(kind + ":") and t_ == tag]
        if not mine:
            return None
        return sum(d for d, _ in mine), sum(t for _, t in mine)

    def _wanted(self, phase: str, round_: int):
        from orchestrator.loop.state import round_seed

        if phase == "sample":
            return "sample", progress_tag(round_seed(self.seed, round_), False)
        if phase == "eval":
            return "sample", progress_tag(self.seed, True)
        if phase == "learn":
            return "learn", round_
        return None

    # --- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception as e:  # progress is a courtesy: it never stops the run
                log.debug("progress poll failed: %s", e)

    def tick(self) -> None:
        status = self.metrics.status()
        phase, round_ = status.get("phase"), status.get("round", 0)
        now = time.monotonic()
        key = (round_, phase)
        if key != self._key:
            self._close_bar()
            self._key, self._since, self._last_line = key, now, now
        found = self.read(phase, round_) if phase in UNITS else None
        if found is None:
            return
        done, total = found
        unit = UNITS[phase]
        if not self.metrics.set_progress(phase, round_, done, total, unit):
            return  # the loop moved on meanwhile
        if self.tty and self.every_s:
            self._draw(f"round {round_} {phase}", done, total, unit)
        elif self.every_s and now - self._last_line >= self.every_s:
            self._last_line = now
            log.info("round %d %s: %d/%d %s (%.0f%%, %.0fs in phase)", round_, phase, done, total, unit,
                     100.0 * done / max(total, 1), now - self._since)

    def _draw(self, desc: str, done: int, total: int, unit: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", leave=False, file=sys.stderr)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

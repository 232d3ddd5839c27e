"""Prompt data: load a ``datasets`` source, check its rows, and draw prompts round by round.

The sampler's order is a function of (seed, epoch) alone and its state is two integers, so a
resumed run draws exactly the prompts an uninterrupted run would.
"""

from __future__ import annotations

import logging
import random
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("odpo.data")

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    pass


def _load_dataset(source: str, split: str, subset: str | None = None):
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    try:
        if path.is_file():
            fmt = _FORMATS.get(path.suffix)
            if fmt is None:
                raise DataError(f"{source}: unsupported file type {path.suffix!r} (json, jsonl, parquet, csv)")
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), subset, split=split)
        if source.startswith((".", "/", "~")):
            raise DataError(f"{source}: no such file or folder")
        return datasets.load_dataset(source, subset, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; the message names the file
        raise DataError(f"{source}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None


def _prompt_problem(prompt) -> str | None:
    if isinstance(prompt, str):
        if not prompt.strip():
            return "empty"
        if any(unicodedata.category(c) == "Cc" and c not in "\n\t\r" for c in prompt) or "\ufffd" in prompt:
            return "control_chars"
        return None
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return None if any(str(m["content"]).strip() for m in prompt) else "empty"
    return "not_text"


@dataclass
class PromptSet:
    """Rows with a usable prompt, plus counts of the rows left out and why."""

    source: str
    rows: list[dict]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)


def load_prompts(source: str, split: str, prompt_field: str, limit: int = 0, subset: str | None = None) -> PromptSet:
    """Load and check rows. A missing prompt column is an error naming the file and field;
    empty, non-text or control-character prompts are skipped and counted; duplicates are kept
    once and counted."""
    ds = _load_dataset(source, split, subset)
    if prompt_field not in ds.column_names:
        raise DataError(
            f"{source}: no column {prompt_field!r} (data.prompt_field); columns are {ds.column_names}"
        )
    rows, skipped, seen = [], Counter(), set()
    for i, row in enumerate(ds):
        problem = _prompt_problem(row[prompt_field])
        if problem:
            skipped[problem] += 1
            if skipped[problem] <= 3:
                log.warning("%s row %d: %s prompt, skipped", source, i, problem)
            continue
        key = repr(row[prompt_field])
        if key in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(key)
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{source}: no usable prompts in column {prompt_field!r} (skipped: {dict(skipped)})")
    if skipped:
        log.warning("%s: %d usable rows; skipped %s", source, len(rows), dict(skipped))
    return PromptSet(source, rows, skipped)


class PromptSampler:
    """Epochs over a shuffled dataset: ``draw(k)`` returns the next k rows, crossing epochs."""

    def __init__(self, size: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.size, self.seed = size, seed
        self.epoch, self.cursor = epoch, cursor
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def draw(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.cursor >= self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(k - len(out), self.size - self.cursor)
            out.extend(self._order[self.cursor : self.cursor + take])
            self.cursor += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": self.size, "seed": self.seed}

    @classmethod
    def from_state(cls, state: dict, size: int, seed: int) -> "PromptSampler":
        if state.get("size") != size:
            log.warning("dataset size changed since the checkpoint (%s -> %s); restarting its order", state.get("size"), size)
            return cls(size, seed)
        return cls(size, seed, state["epoch"], state["cursor"])

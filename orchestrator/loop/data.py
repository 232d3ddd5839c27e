"""Prompt data: load a ``datasets`` source, check its rows, and draw prompts round by round.

A source that cannot be read (missing, bytes that are not UTF-8, a broken JSON line, an
unreadable parquet file) is one ``DataError`` line naming the file and, where it can, the line
or row; rows whose prompt is unusable are skipped and counted (``PromptSet.skipped``).
The sampler's order is a function of (seed, epoch) alone and its state is two integers, so a
resumed run draws exactly the prompts an uninterrupted run would.
"""

from __future__ import annotations

import logging
import random
import unicodedata
from collections import Counter
from contextlib import contextmanager
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
            if path.suffix in _TEXT_SUFFIXES:
                _check_utf8(path, source)
            try:
                with _quiet("datasets"):  # it logs the parser's error too; ours names the file or line
                    return datasets.load_dataset(fmt, data_files=str(path), split="train")
            except Exception:
                if path.suffix == ".jsonl":
                    _check_json_lines(path, source)  # a message naming the line beats pyarrow's
                raise
        if source.startswith((".", "/", "~")) and not path.is_dir():
            raise DataError(f"{source}: no such file or folder")
        with _quiet("datasets"):
            return datasets.load_dataset(str(path) if path.is_dir() else source, subset, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; the message names the file
        raise DataError(f"{source}: cannot load ({_one_line(e)})") from None


@contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


_TEXT_SUFFIXES = {".json", ".jsonl", ".csv"}
_CHUNK = 1 << 24


def _check_utf8(path: Path, source: str) -> None:
    """Fail naming the line when a text file is not UTF-8. pyarrow's JSON reader accepts such
    bytes and only fails later, on reading the row, with a bare ``UnicodeDecodeError``."""
    lines_before, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            data = carry + block
            cut = data.rfind(b"\n") + 1 if block else len(data)  # decode whole lines only
            whole, carry = data[:cut], data[cut:]
            try:
                whole.decode("utf-8")
            except UnicodeDecodeError as e:
                line = lines_before + whole.count(b"\n", 0, e.start) + 1
                start = whole.rfind(b"\n", 0, e.start) + 1
                column = len(whole[start:e.start].decode("utf-8")) + 1  # in characters
                raise DataError(f"{source}: line {line}: not valid UTF-8 "
                                f"(byte 0x{whole[e.start]:02x} at column {column})") from None
            lines_before += whole.count(b"\n")
            if not block:
                return


def _check_json_lines(path: Path, source: str) -> None:
    import json

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: line {lineno}: not valid JSON "
                                f"({e.msg.removesuffix(' at')} at column {e.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{source}: line {lineno}: expected a JSON object, got {type(value).__name__}")


def _one_line(e: BaseException) -> str:
    """``Type: message`` of the error that says what went wrong, not of the wrapper around it
    (datasets' ``DatasetGenerationError`` hides the parser's message in its cause)."""
    while type(e).__name__ == "DatasetGenerationError" and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def prompt_problem(prompt) -> str | None:
    """Why a prompt is unusable (``empty``, ``control_chars``, ``not_text``), or None."""
    if isinstance(prompt, str):
        if not prompt.strip():
            return "empty"
        if any(unicodedata.category(c) == "Cc" and c not in "\n\t\r" for c in prompt) or "\ufffd" in prompt:
            return "control_chars"
        return None
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return None if any(str(m["content"]).strip() for m in prompt) else "empty"
    return "not_text"


def _rows(ds, source: str):
    """``enumerate(ds)``, with a row that cannot be decoded (e.g. bytes that are not UTF-8 in a
    parquet string column) turned into a ``DataError`` naming the source and row."""
    it = iter(ds)
    i = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{source}: row {i}: cannot read ({_one_line(e)})") from None
        yield i, row
        i += 1


@dataclass
class PromptSet:
    """Rows with a usable prompt, plus counts of the rows left out and why."""

    source: str
    rows: list[dict]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)


def load_prompts(source: str, split: str, prompt_field: str, limit: int = 0, subset: str | None = None) -> PromptSet:
    """Load and check rows. An unreadable source or a missing prompt column is a ``DataError``
    naming the file (and line, row or field); empty, null, non-text or control-character prompts
    are skipped and counted; duplicates are kept once and counted."""
    ds = _load_dataset(source, split, subset)
    if prompt_field not in ds.column_names:
        raise DataError(
            f"{source}: no column {prompt_field!r} (data.prompt_field); columns are {ds.column_names}"
        )
    rows, skipped, seen = [], Counter(), set()
    for i, row in _rows(ds, source):
        problem = prompt_problem(row[prompt_field])
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
    """Epochs over a shuffled dataset: ``draw(k)`` returns the next k rows, crossing epochs.
    ``inbox`` is the inbox's cursor (``orchestrator/service/inbox.py``: next batch, next row in
    it), carried here so that it is saved, rewound and resumed with the dataset's."""

    def __init__(self, size: int, seed: int, epoch: int = 0, cursor: int = 0, inbox: tuple[int, int] = (1, 0)):
        self.size, self.seed = size, seed
        self.epoch, self.cursor = epoch, cursor
        self.inbox = tuple(inbox)
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
        return {"epoch": self.epoch, "cursor": self.cursor, "size": self.size, "seed": self.seed,
                "inbox": list(self.inbox)}

    @classmethod
    def from_state(cls, state: dict, size: int, seed: int) -> "PromptSampler":
        inbox = tuple(state.get("inbox") or (1, 0))
        if state.get("size") != size:
            log.warning("dataset size changed since the checkpoint (%s -> %s); restarting its order", state.get("size"), size)
            return cls(size, seed, inbox=inbox)
        return cls(size, seed, state["epoch"], state["cursor"], inbox=inbox)

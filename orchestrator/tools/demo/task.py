"""The demo task: 2-digit addition ("17+26=" -> "43"), with a fixed held-out eval set.

Pure Python (no torch): the data files shipped under ``assets/demo/data`` are made by
``write_data`` with a fixed seed, and the demo's judge (``judges.verifiable``) reads the gold
answer from each row's ``answer`` column.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

EVAL_SIZE = 500
DATA_SEED = 1234


def all_problems() -> list[dict]:
    """Every a+b with a, b in 10..99, as rows with ``prompt`` and ``answer`` columns."""
    return [
        {"prompt": f"{a}+{b}=", "answer": str(a + b)}
        for a in range(10, 100)
        for b in range(10, 100)
    ]


def split_problems(seed: int = DATA_SEED, eval_size: int = EVAL_SIZE) -> tuple[list[dict], list[dict]]:
    """Shuffle every problem with ``seed`` and hold out the first ``eval_size`` as the eval set."""
    rows = all_problems()
    random.Random(seed).shuffle(rows)
    return rows[eval_size:], rows[:eval_size]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def write_data(out_dir: Path, seed: int = DATA_SEED) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; returns their paths."""
    return write_split(*split_problems(seed), out_dir)


def write_split(train: list[dict], held_out: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """Write a task's ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; returns their paths."""
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    write_jsonl(train, train_path)
    write_jsonl(held_out, eval_path)
    return train_path, eval_path

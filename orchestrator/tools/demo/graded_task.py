"""The graded demo task: 3-digit addition ("417+385=" -> "802") scored digit by digit.

The judge (``judges.verifiable:VerifiableJudge`` with ``mode: places``) gives the share of the
sum's digits in place, counted from the units, so an answer with one wrong digit out of three
scores 2/3 where the addition demo would score 0. The model writes the most significant digit
first, before the carries that decide it, so its samples are usually right in some places and
wrong in others, and the best of 8 is usually still imperfect (docs/demo.md measures it).

Pure Python (no torch): the files under ``assets/demo-graded/data`` are made by ``write_data``
with a fixed seed; ``orchestrator/tools/demo/model.py`` trains the model on the train split.
"""

from __future__ import annotations

import random
from pathlib import Path

from orchestrator.tools.demo.task import write_split

TRAIN_SIZE = 20_000
EVAL_SIZE = 500
DATA_SEED = 2345
JUDGE_KWARGS = {"answer_field": "answer", "mode": "places", "align": "right"}
"""How ``configs/demo-graded.yaml`` builds its judge (the same in the tests and the model's summary)."""


def split_problems(seed: int = DATA_SEED, train_size: int = TRAIN_SIZE,
                   eval_size: int = EVAL_SIZE) -> tuple[list[dict], list[dict]]:
    """Distinct a+b with a, b in 100..999, drawn with ``seed``: ``train_size`` rows to train on
    and ``eval_size`` held out, as rows with ``prompt`` and ``answer`` columns."""
    rng = random.Random(seed)
    pairs = rng.sample(range(900 * 900), train_size + eval_size)
    rows = [{"prompt": f"{100 + k // 900}+{100 + k % 900}=", "answer": str(200 + k // 900 + k % 900)} for k in pairs]
    return rows[eval_size:], rows[:eval_size]


def write_data(out_dir: Path, seed: int = DATA_SEED) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; returns their paths."""
    return write_split(*split_problems(seed), out_dir)

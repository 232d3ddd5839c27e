"""The rehearsal's task: "Write at least k characters about <topic>.", scored by the verifiable
judge in ``regex`` mode (the reply, stripped, has at least ``answer`` = k characters).

A random-weight model (the rehearsal model) gets nothing right on a task about content, so
every group of samples would tie and no pair would form; reply length varies from sample to
sample, so a length target yields pairs and the whole loop runs: samples, scores, pairs, DPO
steps, weight syncs. Targets double from 1 to 128 characters, so some prompts split the samples
whatever the model's typical reply length. Pure Python; the files under ``assets/rehearsal`` are
written by ``write_data``.
"""

from __future__ import annotations

import random
from pathlib import Path

from orchestrator.tools.demo.task import write_jsonl

TARGETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOPICS = ("apples", "books", "rivers", "numbers", "trains", "music", "gardens", "stars", "bridges", "clocks",
          "maps", "birds", "bread", "winter", "letters", "stones")
PATTERN = "(?s).{{answer},}"
"""``judges.verifiable:VerifiableJudge(mode="regex", pattern=PATTERN)``: at least ``answer`` characters."""
DATA_SEED = 4321


def problems(seed: int = DATA_SEED) -> tuple[list[dict], list[dict]]:
    """Every (target, topic) prompt, shuffled with ``seed``: 112 to train on, 16 held out."""
    rows = [{"prompt": f"Write at least {k} characters about {topic}.", "answer": str(k)}
            for k in TARGETS for topic in TOPICS]
    random.Random(seed).shuffle(rows)
    return rows[16:], rows[:16]


def write_data(out_dir: Path, seed: int = DATA_SEED) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; returns their paths."""
    train, held_out = problems(seed)
    write_jsonl(train, out_dir / "train.jsonl")
    write_jsonl(held_out, out_dir / "eval.jsonl")
    return out_dir / "train.jsonl", out_dir / "eval.jsonl"

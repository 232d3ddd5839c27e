"""The next round's samples in a checkpoint (async mode), so that a resumed run is the run that
was interrupted.

In ``async`` mode round t+1 is sampled, with the weights of round t-1's training, while round t
is judged and trained. A checkpoint taken after round t therefore waits for that sampling and
stores its result in ``pending_samples.json``: the round, the prompt cursor after its prompts,
and every sample (the prompts' positions in the training set stand in for their dataset rows;
an inbox prompt, position -1, keeps its row).
A resumed run judges and trains exactly those samples as its first round, then samples the next
round with the checkpoint's weights, as the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from common.types import SampleGroup
from judges.base import Completion
from orchestrator.loop.state import DrawnRound
from orchestrator.rundir import atomic_write_text

PENDING_FILE = "pending_samples.json"


def save_carried(pending: DrawnRound, folder: Path) -> dict:
    """Write ``pending``'s collected samples into a checkpoint folder; returns what the loop
    state records about it."""

    groups = []
    for index, group in zip(pending.indices, pending.groups):
        fields = dataclasses.asdict(group)
        if index >= 0:
            fields.pop("row")
        groups.append({"index": int(index), **fields})
    atomic_write_text(folder / PENDING_FILE, json.dumps({"round": pending.round, "groups": groups}) + "\n")
    return {"round": pending.round, "sampler": pending.sampler_after, "file": PENDING_FILE}


def load_carried(folder: Path, saved: dict | None, rows: list[dict], prompt_field: str) -> DrawnRound | None:
    """The pending round a checkpoint saved (``saved`` is its ``loop_state.json`` entry), with
    each sample's dataset row taken back from ``rows``; None when it saved none."""

    if not saved:
        return None
    data = json.loads((folder / saved["file"]).read_text())
    indices, groups = [], []
    for g in data["groups"]:
        index = g.pop("index")
        if index < 0:  # an inbox prompt: its row was saved with it
            groups.append(SampleGroup(completions=[Completion(**c) for c in g.pop("completions")], **g))
            indices.append(index)
            continue
        if not 0 <= index < len(rows) or rows[index].get(prompt_field) != g["prompt"]:
            raise ValueError(f"{folder / saved['file']}: prompt {index} of the saved samples is not the "
                             f"training set's prompt {index}: was data.source changed?")
        completions = [Completion(**c) for c in g.pop("completions")]
        groups.append(SampleGroup(row=rows[index], completions=completions, **g))
        indices.append(index)
    return DrawnRound(int(data["round"]), indices, saved["sampler"], groups=groups)

"""Regenerating every k rounds: offline and iterative DPO through the same loop.

``loop.regenerate_every: k`` (default 1: every round samples the current policy, online DPO).
With k > 1 the rounds fall into windows of k: rounds 1..k, k+1..2k, ... The first round of a
window (its *regeneration round*) draws the prompts of every round of the window — the same
prompts, in the same order, that an online run draws in those rounds — and samples each round's
share with the policy it holds then (the weights of the end of the previous window) and with that
round's own sampling seed, so that the samples of a regeneration round are exactly the ones an
online run samples in that round. Each round's samples are written to
``samples/round_NNNNNN.json``; every round of the window then judges, selects pairs from and trains
on its own file, in order, with the same batch sizes as an online run.

- k = ``loop.rounds``: offline DPO — the initial policy is sampled once for the whole run.
- k = ``loop.rounds / K``: iterative DPO with K iterations (the RLHFlow recipe).

Judging happens in the round that trains on the samples (a judge that uses the policy, like a
self-rewarding one, judges with the then-current policy). Pairs from a window are off-policy by
design: ``policy_lag`` in the metrics shows by how many versions; the stale filter
(``loop.max_policy_lag``) compares them with the version that sampled the window, not with the
learner's, so it never drops them. A resumed run reads the rest of its window from the files, so a
window's rounds train on the same samples with or without an interruption.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from common.types import SampleGroup
from judges.base import Completion
from orchestrator.rundir import atomic_write_text


class SampleBank:
    """The samples of the current window, one file per round under ``<run>/samples/``."""

    def __init__(self, run_root: str | Path, every: int):
        self.dir = Path(run_root) / "samples"
        self.every = every
        self.loaded: dict[int, tuple[dict, list[SampleGroup]]] = {}

    def window_start(self, r: int) -> int:
        return r - (r - 1) % self.every

    def is_regeneration_round(self, r: int) -> bool:
        return self.window_start(r) == r

    def window(self, r: int) -> range:
        # Not cut at loop.rounds: a run resumed with more rounds finds every round of its window
        # (choose k dividing loop.rounds, or the last window samples rounds that never run).
        return range(r, r + self.every)

    def path(self, r: int) -> Path:
        return self.dir / f"round_{r:06d}.json"

    def take(self, r: int, version: int, sample: Callable[[int], list[SampleGroup]]) -> list[SampleGroup]:
        """Round ``r``'s samples. On a regeneration round, ``sample(j)`` is called for each round j
        of the window, in order (it draws round j's prompts and samples them with round j's seed),
        and every round's samples are written; otherwise they are read back."""
        if self.is_regeneration_round(r):
            self.loaded.clear()
            self.dir.mkdir(parents=True, exist_ok=True)
            for j in self.window(r):
                groups = sample(j)
                header = {"round": j, "sampled_at_round": r, "policy_version": version, "regenerate_every": self.every}
                atomic_write_text(self.path(j), json.dumps({**header, "groups": [_dump(g) for g in groups]},
                                                           default=_plain) + "\n")
                self.loaded[j] = (header, groups)
        if r not in self.loaded:
            self.loaded = {r: self._read(r)}
        return self.loaded[r][1]

    def record(self, r: int) -> dict:
        """The round's metrics fields: whether it sampled, and which round and policy version did."""
        header = self.loaded[r][0]
        return {"regenerated": header["sampled_at_round"] == r, "sampled_at_round": header["sampled_at_round"],
                "sample_policy_version": header["policy_version"]}

    def sample_version(self, r: int) -> int:
        return self.loaded[r][0]["policy_version"]

    def _read(self, r: int) -> tuple[dict, list[SampleGroup]]:
        path = self.path(r)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no samples for round {r} (loop.regenerate_every={self.every}: "
                                    f"they were written at round {self.window_start(r)})")
        doc = json.loads(path.read_text())
        expected = self.window_start(r)
        if doc.get("sampled_at_round") != expected or doc.get("round") != r:
            raise ValueError(f"{path}: holds round {doc.get('round')} sampled at round {doc.get('sampled_at_round')}, "
                             f"expected round {r} sampled at round {expected} (did loop.regenerate_every change "
                             f"from {doc.get('regenerate_every')} to {self.every}?)")
        header = {k: v for k, v in doc.items() if k != "groups"}
        return header, [_load(g) for g in doc["groups"]]


def _dump(g: SampleGroup) -> dict:
    return {"prompt": g.prompt, "row": g.row, "policy_version": g.policy_version,
            "prompt_token_ids": list(g.prompt_token_ids), "skipped": g.skipped,
            "completions": [{"text": c.text, "finish_reason": c.finish_reason, "logprob": c.logprob,
                             "token_ids": None if c.token_ids is None else list(c.token_ids),
                             "stop_reason": c.stop_reason} for c in g.completions]}


def _load(d: dict) -> SampleGroup:
    # sample_s stays 0: a round that reads its samples spent no time sampling.
    return SampleGroup(prompt=d["prompt"], row=d["row"], policy_version=d["policy_version"],
                       prompt_token_ids=d["prompt_token_ids"], skipped=d["skipped"],
                       completions=[Completion(**c) for c in d["completions"]])


def _plain(value):
    """numpy scalars and arrays from a dataset row, as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a dataset row value of type {type(value).__name__} cannot be written to samples/")

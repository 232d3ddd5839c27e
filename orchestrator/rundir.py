"""The run directory: resolved config, metrics, pairs, checkpoints, status — written atomically.

Layout (see docs/run-directory.md)::

    runs/<name>/config.yaml            resolved config
    runs/<name>/metrics.jsonl          one JSON object per round
    runs/<name>/pairs/round_NNNNNN.parquet   every pair, with the exact token ids the learner trained
    runs/<name>/checkpoints/round_NNNNNN/{policy/ (LoRA: adapter/), state/, trainer.json, loop_state.json}  (actors/learner/weights/checkpoint.py)
    runs/<name>/status.json            the live /status document
    runs/<name>/plots/

Every file is written to a temporary name, fsync'd, renamed, and its folder fsync'd
(``actors.durable``), so a crash or power loss never leaves a half file; a checkpoint folder is
complete only when its ``loop_state.json`` (written last) parses.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from actors.durable import fsync_dir, replace_durably, write_atomic, write_text_atomic
from common.types import PreferencePair

CHECKPOINT_STATE = "loop_state.json"


def atomic_write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.pairs_dir = self.root / "pairs"
        self.checkpoints_dir = self.root / "checkpoints"
        self.plots_dir = self.root / "plots"
        self.metrics_path = self.root / "metrics.jsonl"
        self.status_path = self.root / "status.json"
        self.config_path = self.root / "config.yaml"

    def create(self) -> None:
        """Make the folders; fail with a clear error when the location is not writable."""
        try:
            for d in (self.root, self.pairs_dir, self.checkpoints_dir, self.plots_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise PermissionError(f"run directory {self.root} is not writable: {e.strerror or e}") from None

    # --- config and status -------------------------------------------------------------------
    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.config_path, yaml_text)

    def write_status(self, status: dict) -> None:
        atomic_write_text(self.status_path, json.dumps(_jsonable(status), indent=1) + "\n")

    # --- metrics -----------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        """Append one round's line; a line is only ever appended whole (fsync'd)."""
        created = not self.metrics_path.exists()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.root)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a crash mid-append is dropped on resume
        return out

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only rounds <= ``last_round`` (a resume redoes the rounds after its checkpoint)."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # --- pairs -------------------------------------------------------------------------------
    def pairs_path(self, round_: int) -> Path:
        return self.pairs_dir / f"round_{round_:06d}.parquet"

    def write_pairs(self, round_: int, records: list[dict]) -> Path | None:
        """One parquet file per round (none for a round without pairs)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.pairs_path(round_)
        if not records:
            path.unlink(missing_ok=True)
            return None
        table = pa.Table.from_pylist(records)
        for name in ID_COLUMNS:  # token ids as int32 lists (half of int64, and what tokenizers emit)
            if name in table.column_names:
                index = table.column_names.index(name)
                table = table.set_column(index, name, table.column(name).cast(pa.list_(pa.int32())))
        return write_atomic(path, lambda tmp: pq.write_table(table, tmp))

    def read_pairs(self, round_: int) -> list[dict]:
        path = self.pairs_path(round_)
        if not path.exists():
            return []
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()

    def remove_pairs_after(self, last_round: int) -> None:
        for p in self.pairs_dir.glob("round_*.parquet"):
            if int(p.stem.split("_")[1]) > last_round:
                p.unlink()

    # --- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self, round_: int) -> Path:
        return self.checkpoints_dir / f"round_{round_:06d}"

    def staging_checkpoint_path(self, round_: int) -> Path:
        path = self.checkpoints_dir / f".round_{round_:06d}.partial"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit_checkpoint(self, staging: Path, round_: int, state: dict) -> Path:
        """Write the loop state last, then move the folder into place (every file in it, the
        folder and ``checkpoints/`` fsync'd around the rename)."""
        atomic_write_text(staging / CHECKPOINT_STATE, json.dumps(state, indent=1) + "\n")
        final = self.checkpoint_path(round_)
        if final.exists():
            shutil.rmtree(final)
        replace_durably(staging, final)
        return final

    def checkpoints(self) -> list[Path]:
        """Committed checkpoint folders, oldest first."""
        found = [p for p in self.checkpoints_dir.glob("round_*") if p.is_dir()]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def prune_checkpoints(self, keep: int, protect: Iterable[int] = ()) -> None:
        """Delete all but the newest ``keep`` checkpoints, sparing the rounds in ``protect``."""
        spared = set(protect)
        for old in self.checkpoints()[:-keep]:
            if int(old.name.split("_")[1]) not in spared:
                shutil.rmtree(old, ignore_errors=True)

    def latest_good_checkpoint(self, is_good=None, max_round: int | None = None) -> tuple[Path | None, list[str]]:
        """The newest checkpoint (of a round up to ``max_round``, when given) whose state parses
        (and that ``is_good`` accepts); also the reasons the newer ones were passed over."""
        skipped = []
        for path in reversed(self.checkpoints()):
            if max_round is not None and int(path.name.rpartition("_")[2]) > max_round:
                continue
            try:
                json.loads((path / CHECKPOINT_STATE).read_text())
            except (OSError, json.JSONDecodeError) as e:
                skipped.append(f"{path.name}: unreadable {CHECKPOINT_STATE} ({type(e).__name__})")
                continue
            problem = is_good(path) if is_good else None
            if problem:
                skipped.append(f"{path.name}: {problem}")
                continue
            return path, skipped
        return None, skipped

    @staticmethod
    def read_checkpoint_state(path: Path) -> dict:
        return json.loads((path / CHECKPOINT_STATE).read_text())


ID_COLUMNS = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")
"""The pairs file's token-id columns: exactly the ids the learner trained (int32 lists)."""


def pair_records(pairs: Iterable, round_: int) -> list[dict]:
    """Pairs as parquet rows: the fixed columns, then the dataset row's other columns."""
    records = []
    for p in pairs:
        rec = {
            "prompt": p.prompt,
            "chosen": p.chosen,
            "rejected": p.rejected,
            "chosen_score": None if p.chosen_score is None else float(p.chosen_score),  # a written (correction) answer is not judged
            "rejected_score": None if p.rejected_score is None else float(p.rejected_score),
            "policy_version": int(p.policy_version),
            "round": int(round_),
            "source": p.source,
            # Where the prompt came from: "dataset" or an inbox batch (orchestrator/service/inbox.py).
            "source_batch": p.row.get("source_batch", "dataset"),
            # Exactly what the learner trained (a rebuilt learner replays from these columns).
            "prompt_token_ids": p.prompt_token_ids,
            "chosen_token_ids": p.chosen_token_ids,
            "rejected_token_ids": p.rejected_token_ids,
            "chosen_finish_reason": p.chosen_finish_reason,
            "rejected_finish_reason": p.rejected_finish_reason,
        }
        for key, value in p.row.items():
            rec.setdefault(key, value)
        records.append(rec)
    return records


_PAIR_FIELDS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score", "policy_version", "source",
                *ID_COLUMNS, "chosen_finish_reason", "rejected_finish_reason")


def pairs_from_records(records: list[dict]) -> list:
    """Pairs read back from a pairs file (the inverse of ``pair_records``)."""

    pairs = []
    for rec in records:
        row = {k: v for k, v in rec.items() if k not in _PAIR_FIELDS and k not in ("round", "source_batch")}
        pairs.append(PreferencePair(row=row, **{k: rec[k] for k in _PAIR_FIELDS if k in rec}))
    return pairs


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a truncated or missing file), or None."""
    import zipfile

    from safetensors import safe_open

    if (path / "trainer.json").exists() or (path / "state").exists():  # the sharded learner format
        from actors.learner.weights.checkpoint import checkpoint_problem as learner_problem

        problem = learner_problem(path)
        if problem:
            return problem
    weights = sorted((path / "policy").glob("*.safetensors")) or sorted((path / "adapter").glob("*.safetensors"))
    if not weights:
        return "no policy weights"  # (a LoRA checkpoint holds its adapter in adapter/)
    for f in [*weights, *path.glob("*.safetensors")]:
        try:
            with safe_open(str(f), "np") as st:
                for key in st.keys():
                    st.get_slice(key)
        except Exception as e:  # truncated files fail in several ways
            return f"{f.name} is unreadable ({type(e).__name__})"
    optimizer = path / "optimizer.pt"
    if optimizer.exists():
        try:
            with zipfile.ZipFile(optimizer) as z:
                if z.testzip() is not None:
                    return "optimizer.pt is corrupt"
        except (zipfile.BadZipFile, OSError):
            return "optimizer.pt is unreadable"
    return None

"""Read back what a run logged to each tracker, through each tool's own reader, as
``{key: {step: [values...]}}`` (a list, so a step logged twice shows)."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path


def _history():
    return defaultdict(lambda: defaultdict(list))


def read_tensorboard(log_dir: Path) -> tuple[dict, dict]:
    """Scalars and text summaries of a log folder, via TensorBoard's EventAccumulator (which
    applies ``purge_step``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = _history()
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            scalars[tag][event.step].append(event.value)
    texts = _history()
    for tag in acc.Tags()["tensors"]:
        for event in acc.Tensors(tag):
            texts[tag][event.step].append(event.tensor_proto.string_val[0].decode())
    return scalars, texts


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` transaction log: a 7-byte file header (``:W&B``, magic,
    version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type:
    1 full, 2 first, 3 middle, 4 last) — LevelDB's log format."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, parts, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the block end
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(parts)
            parts = b""
    return records


def read_wandb_offline(wandb_dir: Path, run_id: str) -> list[tuple[dict, dict, str]]:
    """History, config and run id of each offline segment of run ``run_id``, oldest first (a
    resumed run writes another ``offline-run-*-<id>`` folder; `wandb sync` uploads them in order)."""
    from wandb.proto import wandb_internal_pb2 as pb

    segments = []
    for folder in sorted(wandb_dir.glob(f"offline-run-*-{run_id}")):
        history, config, rid = _history(), {}, None
        for raw in _wandb_records(folder / f"run-{run_id}.wandb"):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run":  # the run record carries the config handed to wandb.init
                rid = rec.run.run_id
                config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                step = int(row.pop("_step"))
                for key, value in row.items():
                    if not key.startswith("_"):
                        history[key][step].append(value)
        segments.append((history, config, rid))
    return segments


def read_mlflow(uri: str, run_id: str) -> tuple[dict, dict, list[str]]:
    """Metric histories, params and artifact paths of an MLflow run, via MlflowClient."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    history = _history()
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            history[key][m.step].append(m.value)
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    artifacts += [a.path for a in client.list_artifacts(run_id, "pairs_sample")]
    return history, dict(run.data.params), artifacts


def read_trackio(project: str, name: str) -> tuple[dict, dict]:
    """Logged rows and config of a local trackio run (TRACKIO_DIR must be set before import)."""
    from trackio.sqlite_storage import SQLiteStorage

    history = _history()
    for row in SQLiteStorage.get_logs(project, name):
        step = row["step"]
        for key, value in row.items():
            if key not in ("step", "timestamp") and value is not None:
                history[key][step].append(value)
    return history, SQLiteStorage.get_run_config(project, name) or {}

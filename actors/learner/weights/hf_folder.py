"""The policy as a Hugging Face folder, written from a stream of tensors.

``write_hf_folder`` takes the tensors one at a time (``Learner.iter_full_state``), so rank 0
never holds more than one of them: the safetensors headers are planned up front from the
names, shapes and dtypes, then each tensor's bytes are appended as it arrives. Files are split
at ``max_shard_bytes`` with a ``model.safetensors.index.json``, as ``save_pretrained`` does; the
folder loads in transformers and vLLM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch

_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}

MAX_SHARD_BYTES = 5 << 30


def plan_files(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int = MAX_SHARD_BYTES):
    """Split ``(name, shape, dtype)`` entries, in order, into files of at most ``max_shard_bytes``
    (a larger tensor gets a file of its own); returns ``[(file name, entries)]``."""
    groups: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _header(entries) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(folder: Path, entries, tensors: Iterable[tuple[str, torch.Tensor | None]], *,
                      write: bool, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Consume ``tensors`` (in ``entries`` order) and, when ``write``, store them under ``folder``.

    Every rank calls it with its stream (a collective stream must be drained everywhere); only
    the writer touches files. A tensor that does not match its entry is a ``ValueError``.
    """
    files = plan_files(entries, max_shard_bytes)
    stream = iter(tensors)
    index = {}
    for file_name, group in files:
        fh = open(folder / file_name, "wb") if write else None
        try:
            if fh:
                fh.write(_header(group))
            for name, shape, dtype in group:
                got_name, t = next(stream)
                if got_name != name:
                    raise ValueError(f"export: expected tensor {name!r}, the stream gave {got_name!r}")
                index[name] = file_name
                if fh:
                    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                        raise ValueError(f"export: tensor {name!r} is {t.dtype} {list(t.shape)}, "
                                         f"planned {dtype} {list(shape)}")
                    fh.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        finally:
            if fh:
                fh.close()
    if write and len(files) > 1:
        total = sum(math.prod(s) * d.itemsize for _, s, d in entries)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n")
    return [f for f, _ in files]


def write_hf_folder(folder: Path, model: torch.nn.Module, tensors, *, source_path: str, tokenizer, write: bool,
                    dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """The policy folder: config and generation config as in ``source_path`` (the model the run
    started from), weights from ``tensors`` (``iter_full_state`` order), the tokenizer."""
    from actors.learner.weights.stream import planned_entries

    entries = planned_entries(model, dtype)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder, entries, tensors, write=write, max_shard_bytes=max_shard_bytes)
    if not write:
        return
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(source_path)
    config.dtype = entries[0][2] if entries else config.dtype
    config.save_pretrained(folder)
    try:
        GenerationConfig.from_pretrained(source_path).save_pretrained(folder)
    except OSError:
        pass  # the source had none
    tokenizer.save_pretrained(folder)

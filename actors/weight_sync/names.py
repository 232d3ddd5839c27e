"""Checkpoint naming: what the engine loads, read from the checkpoint's own files, and the learner's
in-memory names turned back into it.

vLLM maps checkpoint names (the safetensors files' names) onto its own fused modules. transformers
5 renames and fuses some weights when it loads a checkpoint (MoE experts become one
``experts.gate_up_proj`` tensor per layer; Mixtral's ``block_sparse_moe`` becomes ``mlp``), so
the learner's state dict is not in checkpoint naming. ``checkpoint_items`` undoes that with
transformers' own reverse conversion (the one ``save_pretrained`` uses), one decoder layer at a
time so that a streamed state dict stays streamed.

No Ray and no vLLM here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from actors.weight_sync.layout import ParamSpec, make_spec, safetensors_shapes

INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint folder: those its index names (what vLLM
    loads), else ``model.safetensors``, else every ``*.safetensors`` in it."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


def read_header(path: str | Path) -> dict:
    """The parsed JSON header of a safetensors file (reads only the header)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(size))


def checkpoint_spec(folder: str | Path, dtype: str | None = None) -> ParamSpec | None:
    """Name -> shape of every tensor in the checkpoint's files (None when it has no safetensors,
    or a file its index names is missing)."""
    files = checkpoint_files(folder)
    if not files or not all(f.is_file() for f in files):
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(safetensors_shapes(read_header(file)))
    return make_spec(shapes, json.loads((Path(folder) / "config.json").read_text()), dtype)


def config_spec(config, dtype: str | None = None) -> ParamSpec:
    """The spec of a model known only by its transformers config (a hub id whose files are not
    local): a meta-device copy's state dict, turned back into checkpoint naming."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(t.shape) for n, t in checkpoint_items(model, model.state_dict().items())}
    return make_spec(shapes, config.to_dict(), dtype)


def _needs_reverting(model) -> bool:
    """Whether transformers renamed or fused any of ``model``'s weights at load time."""
    if getattr(model, "config", None) is None:  # not a transformers model
        return False
    from transformers.core_model_loading import revert_weight_conversion

    meta = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in model.state_dict().items()}
    return sorted(revert_weight_conversion(model, dict(meta))) != sorted(meta)


def checkpoint_items(model, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``items`` (``model``'s state dict, in transformers' in-memory naming, possibly streamed) in
    checkpoint naming. A model that transformers loaded without renaming passes through as is."""
    if model is None or not _needs_reverting(model):
        yield from items
        return
    from transformers.core_model_loading import revert_weight_conversion

    group: dict[str, torch.Tensor] = {}
    key = None
    for name, tensor in items:
        match = _LAYER.match(name)
        this = match.group(1) if match else name
        if group and this != key:
            yield from revert_weight_conversion(model, group).items()
            group = {}
        key = this
        group[name] = tensor
    if group:
        yield from revert_weight_conversion(model, group).items()


def checkpoint_shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    """``model``'s parameters in checkpoint naming, name and global shape, without gathering or
    copying any tensor (FSDP shards report their global shape)."""
    meta = ((n, torch.empty(t.shape, dtype=t.dtype, device="meta")) for n, t in model.state_dict().items())
    return [(n, tuple(t.shape)) for n, t in checkpoint_items(model, meta)]

"""Moving whole models in and out of sharded ranks one tensor at a time.

- ``load_streamed``: fill a materialized (possibly FSDP-sharded) model from a source that only
  rank 0 reads. Each tensor is read, cast, and scattered so that a rank receives its own shard
  and nothing else (a replicated tensor is broadcast into place). No rank ever holds more than
  its shards plus one tensor.
- ``iter_full``: the reverse, for consumers (weight sync, the Hugging Face export): the model's
  tensors one at a time, each gathered whole on rank 0 only. A collective on every rank.
- ``SafetensorsSource`` / ``StateDictSource``: what ``load_streamed`` reads on rank 0.

Names are the model's state-dict names (Hugging Face checkpoint naming). Tied parameters (a
shared embedding and LM head) are one tensor: loaded and yielded once under the first name, the
other names are ``tied_aliases``. LoRA adapters (modules marked ``is_adapter``,
``actors.learner.lora``) are not part of the base model: its loads and exports leave them out, and
``iter_full(..., adapters=True)`` yields them alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -- sources (read on rank 0 only) -------------------------------------------------------------


class SafetensorsSource:
    """The ``*.safetensors`` files of a Hugging Face folder (or one file): headers up front,
    tensors on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = [self.folder] if self.folder.is_file() else sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.folder}: no *.safetensors weights")
        self._where: dict[str, Path] = {}
        self._entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for file in files:
            with open(file, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                self._where[name] = file
                self._entries.append((name, tuple(info["shape"]), _DTYPES[info["dtype"]]))
        self._open: dict[Path, object] = {}

    def entries(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return list(self._entries)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._where[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_tensor(name)


class StateDictSource:
    """An in-memory state dict (legacy checkpoints, tests)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def entries(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(k, tuple(v.shape), v.dtype) for k, v in self.state.items()]

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def resolve_folder(path: str) -> Path:
    """A local folder as is; a hub id downloaded (weights and json only) to the local cache."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))


# -- names ---------------------------------------------------------------------------------------


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Second and later names of a tensor that several modules share -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def adapter_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the LoRA adapters' tensors (modules marked ``is_adapter``)."""
    return {f"{mod}.{name}" for mod, m in model.named_modules() if getattr(m, "is_adapter", False)
            for name, _ in m.named_parameters(recurse=False)}


def _targets(model: torch.nn.Module, adapters: bool = False) -> dict[str, torch.Tensor]:
    """State-dict tensors by name, tied aliases left out (DTensors under FSDP): the base model's,
    or with ``adapters`` its LoRA adapters' alone."""
    aliases, extra = tied_aliases(model), adapter_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in aliases and (k in extra) == adapters}


def _param_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()} - adapter_names(model)


# -- sharded tensors -------------------------------------------------------------------------------


def _row_sharded(t: torch.Tensor):
    """(group, rows per rank) when ``t`` is a DTensor sharded on dim 0 over a 1-D mesh whose
    rank 0 is global rank 0 (FSDP2's layout); None otherwise."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return None
    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        return None
    group = mesh.get_group()
    if dist.get_global_rank(group, 0) != 0:
        return None
    world = dist.get_world_size(group)
    return group, -(-t.shape[0] // world)


def _local_rows(t, rows: int, group) -> tuple[int, int]:
    start = dist.get_rank(group) * rows
    return min(start, t.shape[0]), min(start + rows, t.shape[0])


@torch.no_grad()
def _scatter_into(target: torch.Tensor, full: torch.Tensor | None) -> None:
    """Write ``full`` (given on global rank 0 only) into ``target``: its shard, or all of it."""
    from torch.distributed.tensor import DTensor

    sharded = _row_sharded(target) if _distributed() else None
    if sharded is not None:
        group, rows = sharded
        local = target.to_local()
        start, end = _local_rows(target, rows, group)
        # A full-size contiguous shard receives in place; a short last shard through a buffer.
        in_place = end - start == rows and local.is_contiguous()
        buf = local if in_place else torch.empty((rows, *target.shape[1:]), dtype=target.dtype, device=local.device)
        chunks = None
        if _rank() == 0:
            padded = full.to(local.device).contiguous()
            if rows * dist.get_world_size(group) != full.shape[0]:  # rows that do not divide: pad
                padded = torch.zeros((rows * dist.get_world_size(group), *target.shape[1:]), dtype=target.dtype,
                                     device=local.device)
                padded[: full.shape[0]].copy_(full)
            chunks = list(padded.chunk(dist.get_world_size(group)))
        dist.scatter(buf, chunks, group=group, group_src=0)
        if not in_place:
            local.copy_(buf[: end - start])
        return
    if isinstance(target, DTensor):  # another layout: broadcast the whole tensor, keep the slice
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        whole = full.to(target.device, target.dtype) if _rank() == 0 else \
            torch.empty(target.shape, dtype=target.dtype, device=target.to_local().device)
        dist.broadcast(whole, src=0)
        shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        target.to_local().copy_(whole[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
        return
    if _rank() == 0:
        target.copy_(full)
    if _distributed():
        dist.broadcast(target, src=0)


@torch.no_grad()
def _gather_full(t: torch.Tensor) -> torch.Tensor | None:
    """The whole of ``t`` on global rank 0 (None elsewhere); a collective for sharded tensors."""
    from torch.distributed.tensor import DTensor

    sharded = _row_sharded(t) if _distributed() else None
    if sharded is not None:
        group, rows = sharded
        world = dist.get_world_size(group)
        local = t.to_local()
        start, end = _local_rows(t, rows, group)
        mine = local if end - start == rows else torch.cat(
            [local, local.new_zeros((rows - (end - start), *t.shape[1:]))])
        full = parts = None
        if _rank() == 0:
            full = torch.empty((rows * world, *t.shape[1:]), dtype=t.dtype, device=local.device)
            parts = list(full.chunk(world))
        dist.gather(mine.contiguous(), parts, group=group, group_dst=0)
        return full[: t.shape[0]] if full is not None else None
    if isinstance(t, DTensor):
        whole = t.full_tensor()
        return whole if _rank() == 0 else None
    return t.detach() if _rank() == 0 else None


# -- whole-model moves -----------------------------------------------------------------------------


def load_streamed(model: torch.nn.Module, source=None, *, where: str = "weights") -> None:
    """Fill ``model`` (materialized, possibly sharded) from ``source``, read on rank 0 only.

    A collective: every rank calls it, rank 0 with the source, the others with None. The names
    are checked on every rank before any tensor moves: a tensor the model lacks, a parameter the
    source lacks, or a wrong shape is a ``ValueError`` naming it (a persistent buffer the source
    lacks keeps its initial value).
    """
    entries = source.entries() if _rank() == 0 else None
    if _distributed():
        box = [entries]
        dist.broadcast_object_list(box, src=0)
        entries = box[0]
    targets, aliases, params = _targets(model), tied_aliases(model), _param_names(model)
    plan, seen = [], set()
    for name, shape, _ in entries:
        key = aliases.get(name, name)
        if key not in targets:
            raise ValueError(f"{where}: tensor {name!r} is not in the model ({type(model).__name__})")
        if tuple(targets[key].shape) != tuple(shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {list(shape)}, the model's is "
                             f"{list(targets[key].shape)}")
        if key in seen:
            continue  # a tied tensor stored under both names: load it once
        seen.add(key)
        plan.append((name, key))
    missing = [k for k in targets if k not in seen and k in params]
    if missing:
        raise ValueError(f"{where}: parameter {missing[0]!r} is missing ({len(missing)} missing)")
    for name, key in plan:
        target = targets[key]
        full = source.get(name).to(dtype=target.dtype) if _rank() == 0 else None
        _scatter_into(target, full)
        del full


def planned_entries(model: torch.nn.Module, dtype: torch.dtype | None = None):
    """``(name, shape, dtype)`` of what ``iter_full`` yields, in its order (no communication)."""
    return [(name, tuple(t.shape), dtype or t.dtype) for name, t in _targets(model).items()]


def iter_full(model: torch.nn.Module, dtype: torch.dtype | None = None, *,
              adapters: bool = False) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(name, tensor)`` for each state-dict tensor of ``model`` (tied aliases left out; the base
    model's, or with ``adapters`` its LoRA adapters'), whole, on CPU and in ``dtype`` (default: as
    held) on rank 0; ``(name, None)`` on the other ranks.

    A collective under FSDP: every rank iterates to the end, in step. Rank 0 holds one gathered
    tensor at a time (plus what the consumer keeps).
    """
    for name, t in _targets(model, adapters).items():
        full = _gather_full(t)
        if full is not None:
            full = full.to("cpu", dtype or full.dtype)
        yield name, full
        del full


@torch.no_grad()
def write_local(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write ``full`` (the same on every rank) into ``target``: its own shard, or all of it."""
    from torch.distributed.tensor import DTensor

    if isinstance(target, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        target.to_local().copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
    else:
        target.copy_(full)


@torch.no_grad()
def copy_local(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """``dst`` := ``src`` tensor by tensor on each rank's own shards (cast to ``dst``'s dtype);
    both sharded the same way (or both whole). No communication."""
    from torch.distributed.tensor import DTensor

    src_state = _targets(src)
    for name, d in _targets(dst).items():
        s = src_state[name]
        d_local = d.to_local() if isinstance(d, DTensor) else d
        s_local = s.to_local() if isinstance(s, DTensor) else s
        d_local.copy_(s_local)

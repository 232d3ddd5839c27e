"""Learner checkpoints: every rank writes and reads its own shards; the policy also as HF.

Layout under ``path`` (format 2)::

    state/          torch.distributed.checkpoint: policy, reference and optimizer, one file per
                    rank holding that rank's shards (under DDP each replicated tensor once), and
                    ``.metadata``. Loading reads only the byte ranges of a rank's own shards, and
                    reshards when the world size or strategy changed.
    policy/         the policy in Hugging Face format (config, safetensors, tokenizer) for serving
                    and for other tools; streamed out tensor by tensor (``hf_folder``).
    trainer.json    format, strategy, world size, scheduler, step counters and the fp16 loss
                    scale; written last.

With LoRA (``learner.lora``) the base model is not written: ``state/`` holds the adapter, its
reference copy and the optimizer (the adapter's state only), ``adapter/`` replaces ``policy/``
(a PEFT adapter folder), and ``trainer.json`` records the base model (path and hashes,
``lora.base_fingerprint``): loading against another base is refused, naming it.

``state`` and ``policy`` are written under temporary names and renamed into place, then
``trainer.json``: a folder without it is incomplete. ``path`` must be on a filesystem every
worker sees. Format 1 (``policy/``, ``reference.safetensors``, ``optimizer.pt``, written by
earlier versions) still loads: its weights are streamed from rank 0 like the initial model.

Every part is fsynced before its rename and the folder after it (``actors.durable``), so a crash
never leaves a half-written part. Each rank also writes ``rng_rank_<k>.json`` (its Python, numpy
and torch RNG states, ``actors.rng_state``) and restores it on load.

This module knows the learner only through the attributes it reads (``model``, ``reference``,
``optimizer``, ...); it imports nothing from ``rank`` (the ``Learner``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from actors import rng_state
from actors.durable import replace_durably, write_text_atomic
from actors.learner.lora import base_fingerprint, base_mismatch

log = logging.getLogger(__name__)

FORMAT = 2
STATE_DIR, POLICY_DIR, TRAINER_FILE = "state", "policy", "trainer.json"
ADAPTER_DIR = "adapter"
_LEGACY_FILES = ("reference.safetensors", "optimizer.pt")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it runs in a single process when there is no process group; that is the
    one-worker learner's normal case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    replace_durably(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _sharded_state(learner: Any, *, optimizer: bool) -> dict[str, Any]:
    """Each rank's shards of policy, reference (tied aliases left out) and optimizer state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from actors.learner.weights.stream import tied_aliases

    state: dict[str, Any] = {}
    if learner.adapters is not None:  # the base is frozen and comes from model.path: the adapter alone
        names = set(learner.adapters.state_names())
        state["adapter"] = {k: v for k, v in get_model_state_dict(learner.model).items() if k in names}
    for key, model in (("policy", learner.model), ("reference", learner.reference)) if learner.adapters is None else ():
        sd = get_model_state_dict(model)
        for alias in tied_aliases(model):
            sd.pop(alias, None)
        state[key] = sd
    if optimizer:
        state["optimizer"] = get_optimizer_state_dict(learner.model, learner.optimizer)
    return state


def save(learner: Any, path: str) -> None:
    """Write the learner's state under ``path``; a collective (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    from actors.learner.weights.hf_folder import write_hf_folder

    root, rank = Path(path), learner.rank
    exported = POLICY_DIR if learner.adapters is None else ADAPTER_DIR
    staged_state, staged_policy = root / f".{STATE_DIR}.partial", root / f".{exported}.partial"
    learner.reshard()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in (staged_state, staged_policy):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    _save_rng(learner, root)
    # An optimizer that has not stepped has no state, and asking DCP for it would create some.
    has_optimizer = bool(learner.optimizer.state)
    state = _sharded_state(learner, optimizer=has_optimizer)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(staged_state))
    del state
    if learner.adapters is None:
        write_hf_folder(staged_policy, learner.model, learner.iter_full_state(), source_path=learner.model_cfg.path,
                        tokenizer=learner.tokenizer, write=rank == 0)
    else:
        learner.adapters.save_peft(staged_policy, learner.model_cfg.path, write=rank == 0)
    _barrier()
    if rank == 0:
        _replace_dir(staged_state, root / STATE_DIR)
        _replace_dir(staged_policy, root / exported)
        for name in _LEGACY_FILES:
            (root / name).unlink(missing_ok=True)
        meta = {"format": FORMAT, "strategy": "fsdp" if learner.fsdp else "ddp", "world_size": learner.world_size,
                "optimizer": has_optimizer, "scheduler": learner.scheduler.state_dict(), "steps": learner.steps,
                "skipped_steps": learner.skipped_steps, "overflow_steps": learner.overflow_steps,
                "loss_scale": learner.scaler.state_dict(), "refreshed_through": learner.refreshed_through}
        if learner.adapters is not None:
            meta["lora"] = {"base": base_fingerprint(learner.model_cfg.path), "r": learner.cfg.lora.r,
                            "targets": learner.adapters.targets}
        write_text_atomic(root / TRAINER_FILE, json.dumps(meta, indent=1) + "\n")
    _barrier()


def load(learner: Any, path: str) -> None:
    """Restore policy, reference, optimizer, scheduler and counters from ``path`` (every rank)."""
    root = Path(path)
    if (root / TRAINER_FILE).exists():
        _load_sharded(learner, root)
    elif all((root / name).exists() for name in (POLICY_DIR, *_LEGACY_FILES)):
        _load_legacy(learner, root)
    else:
        raise FileNotFoundError(f"learner checkpoint {root}: missing {TRAINER_FILE}")


def _load_sharded(learner: Any, root: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    meta = json.loads((root / TRAINER_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"learner checkpoint {root}: unknown format {meta.get('format')!r}")
    _check_lora(learner, root, meta.get("lora"))
    learner.reshard()
    if not meta["optimizer"]:
        learner.optimizer.state.clear()  # saved before the first step: start the moments afresh
    state = _sharded_state(learner, optimizer=meta["optimizer"])
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(root / STATE_DIR))  # in place, each rank its own shards
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    partial = StateDictOptions(strict=False)  # tied aliases (with LoRA: the base) were left out
    if learner.adapters is not None:
        set_model_state_dict(learner.model, state["adapter"], options=partial)
    else:
        set_model_state_dict(learner.model, state["policy"], options=partial)
        set_model_state_dict(learner.reference, state["reference"], options=partial)
    if meta["optimizer"]:
        set_optimizer_state_dict(learner.model, learner.optimizer, state["optimizer"])
    learner.scheduler.load_state_dict(meta["scheduler"])
    # A step that failed after its backward (an error, or an injected fault) left gradients behind;
    # the restored state has none, or the next step would add them in.
    learner.optimizer.zero_grad(set_to_none=True)
    learner.steps, learner.skipped_steps = int(meta["steps"]), int(meta["skipped_steps"])
    learner.overflow_steps = int(meta.get("overflow_steps", 0))
    learner.scaler.load_state_dict(meta.get("loss_scale"))
    learner.refreshed_through = meta.get("refreshed_through")
    learner.schedule.apply_config()
    _load_rng(learner, root)


def _check_lora(learner: Any, root: Path, saved: dict | None) -> None:
    """A checkpoint loads only into a learner that trains what it holds: full weights, or an
    adapter of the same shape on the same base model."""
    if (saved is None) != (learner.adapters is None):
        held = "a LoRA adapter" if saved else "full weights"
        raise ValueError(f"learner checkpoint {root} holds {held}, and learner.lora is "
                         f"{'set' if learner.adapters is not None else 'not set'}")
    if saved is None:
        return
    why = base_mismatch(saved["base"], base_fingerprint(learner.model_cfg.path))
    if why:
        raise ValueError(f"learner checkpoint {root}: {why}")
    if saved["r"] != learner.cfg.lora.r or saved["targets"] != learner.adapters.targets:
        raise ValueError(f"learner checkpoint {root}: its adapter has r {saved['r']} on {saved['targets']}, "
                         f"learner.lora asks for r {learner.cfg.lora.r} on {learner.adapters.targets}")


def _load_legacy(learner: Any, root: Path) -> None:
    """Format 1: weights streamed from rank 0's reads; the optimizer file is read by every rank
    (demo-sized checkpoints only ever had this format)."""
    from actors.learner.weights.stream import SafetensorsSource, load_streamed

    _check_lora(learner, root, None)
    state = torch.load(root / "optimizer.pt", map_location="cpu", weights_only=True)
    if state.get("format") != 1:
        raise ValueError(f"learner checkpoint {root}: unknown optimizer.pt format {state.get('format')!r}")
    saved_strategy, strategy = state["strategy"], "fsdp" if learner.fsdp else "ddp"
    if saved_strategy != strategy and state["optimizer"]["state"]:
        raise ValueError(f"learner checkpoint {root}: optimizer saved under {saved_strategy}, "
                         f"learner.strategy is now {strategy}")
    learner.reshard()
    rank0 = learner.rank == 0
    load_streamed(learner.model, SafetensorsSource(root / POLICY_DIR) if rank0 else None, where=f"{root}/policy")
    load_streamed(learner.reference, SafetensorsSource(root / "reference.safetensors") if rank0 else None,
                  where=f"{root}/reference.safetensors")
    if state["optimizer_keys"] == "names":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(learner.model, learner.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.optimizer.zero_grad(set_to_none=True)  # as in _load_sharded
    learner.steps, learner.skipped_steps = int(state["steps"]), int(state["skipped_steps"])
    learner.schedule.apply_config()
    _load_rng(learner, root)


def checkpoint_problem(path: Path) -> str | None:
    """Why the learner part of a format-2 checkpoint folder cannot be loaded (a missing or
    truncated file), or None. Reads only ``trainer.json`` and the shard index; no collective."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = json.loads((path / TRAINER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{TRAINER_FILE} is unreadable ({type(e).__name__})"
    if meta.get("format") != FORMAT:
        return f"{TRAINER_FILE}: unknown format {meta.get('format')!r}"
    try:
        metadata = FileSystemReader(str(path / STATE_DIR)).read_metadata()
    except Exception as e:  # missing or truncated .metadata fail in several ways
        return f"{STATE_DIR}/.metadata is unreadable ({type(e).__name__})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        f = path / STATE_DIR / name
        if not f.exists() or f.stat().st_size < end:
            return f"{STATE_DIR}/{name} is {'missing' if not f.exists() else 'truncated'}"
    return None


# -- RNG states (one file per rank) -------------------------------------------------------------

def _save_rng(learner: Any, root: Path) -> None:

    write_text_atomic(root / f"rng_rank_{learner.rank}.json", json.dumps(rng_state.capture()))


def _load_rng(learner: Any, root: Path) -> None:

    path = root / f"rng_rank_{learner.rank}.json"
    if not path.exists():  # older checkpoints, or more ranks than when it was saved
        log.warning("learner checkpoint %s: no %s; rank %d keeps its current RNG state", root, path.name, learner.rank)
        return
    rng_state.restore(json.loads(path.read_text()))

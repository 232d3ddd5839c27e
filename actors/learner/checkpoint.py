"""Learner checkpoints: the policy in Hugging Face format, the reference, optimizer and scheduler.

Layout under ``path``::

    policy/                   config.json, model.safetensors, tokenizer files (loads in vLLM and transformers)
    reference.safetensors     the frozen reference (tied tensors stored once, aliases in the metadata)
    optimizer.pt              optimizer, scheduler and step counters (plain containers: torch.load(weights_only=True))
    rng_rank_<k>.json         each rank's Python, numpy and torch RNG states (``actors.rng_state``)

Rank 0 writes each part to a temporary name, fsyncs it, renames it into place and fsyncs the
folder (``actors.durable``), so a crash never leaves a half-written part; every rank writes its
own RNG file the same way. Under FSDP gathering the full tensors is a collective: every rank calls
``save_checkpoint``. ``load_checkpoint`` is called on every rank and reads ``path`` itself, so on
a multi-node cluster ``path`` must be on a filesystem every worker sees.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from actors.durable import replace_durably, write_atomic, write_text_atomic

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from actors.learner.engine import Learner

_FORMAT = 1


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _reference_state(learner: "Learner") -> dict[str, torch.Tensor]:
    if learner.fsdp and not learner.cfg.ref_on_cpu:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(learner.reference, options=_full_options(cpu_offload=True))
    return {k: v.detach().cpu() for k, v in learner.reference.state_dict().items()}


def _optimizer_state(learner: "Learner") -> dict:
    if learner.fsdp and learner.optimizer.state:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        # Keyed by parameter name; gathered to full tensors on rank 0.
        return get_optimizer_state_dict(learner.model, learner.optimizer, options=_full_options(cpu_offload=True))
    # DDP ranks hold identical optimizer state; an empty FSDP state is saved the same way.
    return learner.optimizer.state_dict()


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors sharing memory (tied embeddings): store each once, note aliases."""
    from safetensors.torch import save_file

    unique, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else name
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.contiguous()
    write_atomic(path, lambda tmp: save_file(unique, str(tmp), metadata={"aliases": json.dumps(aliases)}))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    replace_durably(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(learner: "Learner", path: str) -> None:
    """Write the learner's state under ``path`` (every rank calls; rank 0 writes)."""
    learner.reshard()
    policy = learner.full_state_dict()
    reference = _reference_state(learner)
    optimizer = _optimizer_state(learner)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    _save_rng(learner, root)
    if learner.rank != 0:
        return
    tmp = root / f".policy.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    learner.model.save_pretrained(tmp, state_dict=policy, safe_serialization=True)
    learner.tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, root / "policy")
    _write_tensors(reference, root / "reference.safetensors")
    state = {
        "format": _FORMAT,
        "strategy": "fsdp" if learner.fsdp else "ddp",
        "optimizer_keys": "names" if learner.fsdp and learner.optimizer.state else "indices",
        "optimizer": optimizer,
        "scheduler": learner.scheduler.state_dict(),
        "steps": learner.steps,
        "skipped_steps": learner.skipped_steps,
    }
    write_atomic(root / "optimizer.pt", lambda tmp: torch.save(state, tmp))


def load_checkpoint(learner: "Learner", path: str) -> None:
    """Restore policy, reference, optimizer, scheduler and counters from ``path`` (every rank)."""
    from transformers import AutoModelForCausalLM

    root = Path(path)
    for part in ("policy", "reference.safetensors", "optimizer.pt"):
        if not (root / part).exists():
            raise FileNotFoundError(f"learner checkpoint {root}: missing {part}")
    dtype = getattr(torch, learner.model_cfg.dtype)
    policy = AutoModelForCausalLM.from_pretrained(root / "policy", dtype=dtype).state_dict()
    reference = _read_tensors(root / "reference.safetensors")
    state = torch.load(root / "optimizer.pt", map_location="cpu", weights_only=True)
    if state.get("format") != _FORMAT:
        raise ValueError(f"learner checkpoint {root}: unknown optimizer.pt format {state.get('format')!r}")
    saved_strategy, strategy = state["strategy"], "fsdp" if learner.fsdp else "ddp"
    if saved_strategy != strategy and state["optimizer"]["state"]:
        raise ValueError(f"learner checkpoint {root}: optimizer saved under {saved_strategy}, "
                         f"learner.strategy is now {strategy}")
    learner.reshard()
    with torch.no_grad():
        if learner.fsdp:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(learner.model, policy, options=_full_options())
            if learner.cfg.ref_on_cpu:
                learner.reference.load_state_dict(reference)
            else:
                set_model_state_dict(learner.reference, reference, options=_full_options())
        else:
            learner.model.load_state_dict(policy)
            learner.reference.load_state_dict(reference)
    if state["optimizer_keys"] == "names":
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(learner.model, learner.optimizer, state["optimizer"], options=_full_options())
    else:
        learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    # A step that failed after its backward (an error, or an injected fault) left gradients behind;
    # the restored state has none, or the next step would add them in.
    learner.optimizer.zero_grad(set_to_none=True)
    learner.steps, learner.skipped_steps = int(state["steps"]), int(state["skipped_steps"])
    _load_rng(learner, root)


# -- RNG states (one file per rank) -------------------------------------------------------------

def _save_rng(learner: "Learner", root: Path) -> None:
    from actors import rng_state

    write_text_atomic(root / f"rng_rank_{learner.rank}.json", json.dumps(rng_state.capture()))


def _load_rng(learner: "Learner", root: Path) -> None:
    from actors import rng_state

    path = root / f"rng_rank_{learner.rank}.json"
    if not path.exists():  # older checkpoints, or more ranks than when it was saved
        log.warning("learner checkpoint %s: no %s; rank %d keeps its current RNG state", root, path.name, learner.rank)
        return
    rng_state.restore(json.loads(path.read_text()))

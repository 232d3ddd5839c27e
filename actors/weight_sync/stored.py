"""What the stored backends (``object_store.py`` with its shared-memory path, ``disk.py``) share.

On the learner's ranks: the policy exported tensor by tensor in checkpoint naming, checked
against the engine's spec before a byte moves and again as each tensor arrives
(``export_policy``). On the driver: ``StoredPublication``, weights stored once that each engine
opens itself, and the calls into the learner's workers (``get``, ``publishing_workers``).

Under DDP only rank 0 publishes (the other ranks hold the same weights: they copy nothing); under
FSDP every rank takes part (gathering is a collective) and rank 0 receives the tensors.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import torch

from actors.weight_sync.base import LearnerRank, LearnerWorkers, Publication, SyncTarget
from actors.weight_sync.layout import ParamSpec, TensorSlot, WeightMismatchError, check_params, dtype_of, plan_layout
from actors.weight_sync.names import checkpoint_items, checkpoint_shapes

Plan = list[tuple[str, tuple[int, ...]]]


# -- on the learner's ranks ---------------------------------------------------------------------


def policy_plan(learner: LearnerRank) -> Plan:
    """``(name, shape)`` of the policy in checkpoint naming, in the order it is exported, without
    gathering a tensor."""
    return checkpoint_shapes(learner.model)


def policy_state(learner: LearnerRank, dtype: str) -> tuple[Plan, Iterator[tuple[str, torch.Tensor]]] | None:
    """The policy as ``(plan, items)``: ``items`` yields ``(name, tensor)`` in checkpoint naming as
    CPU tensors, in ``dtype`` from a GPU learner (cast before the tensor leaves the GPU), else in
    the learner's own dtype (the consumer casts, in the same pass as its copy). Every rank calls
    it; only rank 0 gets the tensors (the others get None, after taking part in every gather)."""
    model = learner.model
    on_gpu = any(p.device.type == "cuda" for p in model.parameters())
    items = learner.iter_full_state(dtype_of(dtype) if on_gpu else None)
    if learner.rank != 0:
        for _ in items:  # take part in the gathers (rank 0 alone gets tensors)
            pass
        return None
    return checkpoint_shapes(model), checkpoint_items(model, items)


class PolicyExport:
    """Rank 0's policy checked against ``spec`` and laid out (``slots``, ``size`` bytes); iterate
    it for ``(index, slot, tensor)`` in slot order as the tensors are gathered."""

    def __init__(self, plan: Plan, items: Iterator[tuple[str, torch.Tensor]], spec: ParamSpec,
                 slots: list[TensorSlot] | None = None):
        names = check_params(plan, spec)  # before a byte moves
        self.size: int | None = None  # given slots were laid out and sized earlier (a streamed buffer)
        if slots is None:
            shapes = dict(plan)
            slots, self.size = plan_layout([(n, spec.dtype or "float32", shapes[n]) for n in names])
        self.slots, self.spec, self._items = slots, spec, items

    def __iter__(self) -> Iterator[tuple[int, TensorSlot, torch.Tensor]]:
        by_name = {s.name: (i, s) for i, s in enumerate(self.slots)}
        seen: set[str] = set()
        for name, tensor in self._items:  # names and shapes checked again as the tensors arrive
            i, slot = by_name.get(name, (None, None))
            if slot is None:
                if name in self.spec.optional:
                    continue
                raise WeightMismatchError(f"weight sync: parameter {name!r} is not in the engine's model")
            if tuple(tensor.shape) != slot.shape or name in seen:
                raise WeightMismatchError(f"weight sync: parameter {name!r} changed shape or appeared twice while "
                                          f"gathering ({list(tensor.shape)}, expected {list(slot.shape)})")
            yield i, slot, tensor
            seen.add(name)
        missing = [n for n in by_name if n not in seen]
        if missing:
            raise WeightMismatchError(f"weight sync: parameter {missing[0]!r} was not produced by the learner")

    def descriptor(self, kind: str, start: float, **extra) -> dict:
        """What an engine needs to open the publication (after the last tensor is written)."""
        return {"kind": kind, "slots": self.slots, "bytes": sum(s.nbytes for s in self.slots), **extra,
                "publish_s": time.perf_counter() - start}


def export_policy(learner: LearnerRank, spec: ParamSpec, slots: list[TensorSlot] | None = None) -> PolicyExport | None:
    """The policy checked against ``spec`` (rank 0); None on the other ranks, which take part."""
    state = policy_state(learner, spec.dtype or "float32")
    return None if state is None else PolicyExport(*state, spec, slots)


def kept_tensors(export: PolicyExport) -> dict[str, torch.Tensor]:
    """Every exported tensor in memory, cast to its slot's dtype."""
    return {slot.name: tensor.to(dtype_of(slot.dtype)).contiguous() for _, slot, tensor in export}


def remove_files(paths: list[str]) -> None:
    """Remove sync files (run on their node); one already gone is fine."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# -- on the driver ------------------------------------------------------------------------------


class StoredPublication(Publication):
    """Weights stored once, as the descriptor ``desc`` says (a driver-owned object-store reference,
    a shared-memory buffer or a file): each engine opens them itself. A streamed one is still
    being written (``pending``): engines load it meanwhile; ``finish`` waits for the learner."""

    def __init__(self, version: int, desc: dict, timeout_s: float, pending: list | None = None):
        self.version, self.desc, self.timeout_s, self.pending = version, desc, timeout_s, pending
        self.kind, self.bytes = desc["kind"], desc["bytes"]
        self.publish_s = desc.get("publish_s")

    def apply(self, target: SyncTarget, indices: list[int]) -> float:
        return max(target.load_weights(indices, self.desc, self.version, self.timeout_s), default=0.0)

    def finish(self) -> None:
        if self.pending:
            refs, self.pending = self.pending, None
            done = get(refs, self.timeout_s, f"the learner publishing weights version {self.version}")
            self.publish_s = self.desc["publish_s"] = done[0][0]["publish_s"]


def get(refs, timeout: float, what: str):
    """``ray.get`` under ``sync.timeout_s``, with an error that says what did not finish."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise TimeoutError(f"weight sync: {what} did not finish within sync.timeout_s={timeout}s") from None


def publishing_workers(learner: LearnerWorkers) -> list:
    """The learner workers a publication needs: every rank under FSDP (gathering is a
    collective), else rank 0 alone (the other DDP ranks hold the same weights; they copy nothing)."""
    fsdp = learner.cfg.strategy == "fsdp" and len(learner.workers) > 1
    return list(learner.workers) if fsdp else [learner.rank0]

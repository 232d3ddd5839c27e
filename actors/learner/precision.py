"""The learner's precision policy, and dynamic loss scaling for fp16 compute.

Master weights, their gradients and AdamW's moments are held in ``model.dtype`` (fp32; bf16 for
a memory-bound "pure bf16" run; fp16 is refused by the config). The forward and backward run
in the compute dtype of ``learner.precision``: under DDP or one process through autocast, under
FSDP2 with several ranks through its ``MixedPrecisionPolicy`` (parameters gathered in the compute
dtype, gradients reduced in fp32). Log-probs: the LM head's product in the compute dtype, the
softmax, the log-probs, their sums and the loss in fp32. fp16's narrow range needs the loss
scaled up before the backward (``LossScaler``); bf16 has fp32's range and needs none.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist

_NAMED = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteWeights(RuntimeError):
    """An optimizer step left an inf or NaN in the policy's weights (the step is not kept)."""


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``learner.precision`` as a dtype; ``auto`` = bf16 on a GPU that has it, fp16 on older GPUs,
    fp32 on CPU (bf16 is slower than fp32 on CPUs without bf16 instructions)."""
    if precision != "auto":
        return _NAMED[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype, *, sharded: bool):
    """The context the forward runs in: autocast to ``dtype`` unless it is fp32, or the model is
    FSDP-sharded (its mixed-precision policy casts the parameters instead)."""
    if dtype == torch.float32 or sharded:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class LossScaler:
    """Dynamic loss scaling (as ``torch.amp.GradScaler``, written for the learner's own step so it
    works alike in one process, under DDP and under FSDP2's sharded gradients).

    The loss is multiplied by ``scale`` before the backward, so small fp16 gradients do not flush
    to zero; the gradients are divided by it before clipping. A step whose gradients overflowed
    (not finite on any rank) is skipped and the scale halved; after ``growth_interval`` good steps
    in a row it doubles. Disabled, every method is the identity.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0
        """Steps without overflow since the scale last changed."""

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> None:
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        """After a step: halve on overflow, double after ``growth_interval`` good steps."""
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict | None) -> None:
        if self.enabled and state:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


@torch.no_grad()
def all_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every element of this rank's part of ``params`` is finite (local shards of DTensors)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    local = [t for t in local if t.numel()]
    if not local:
        return True
    # The max-norm is inf/NaN exactly when an element is (one fused pass, no mask per tensor).
    norms = torch._foreach_norm(local, float("inf"))
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def check_finite(params: list[torch.nn.Parameter], round_: int, steps: int, device: torch.device) -> None:
    """After an optimizer step: every trained weight finite on every rank, else ``NonFiniteWeights``
    (the step is not kept: the loop redoes the round from its start, or stops naming it)."""
    bad = torch.tensor([0.0 if all_finite(params) else 1.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bool(bad[0]):
        raise NonFiniteWeights(f"round {round_}: optimizer step {steps} made the policy's weights "
                               "non-finite (inf/NaN); the step is not kept and its weights are not published")

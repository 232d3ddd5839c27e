"""How the learner's models are spread over the ranks: FSDP2 or DDP, and activation checkpointing.

FSDP2 (``fully_shard``) as large-model trainers set it up: one unit per decoder layer (its
parameters are gathered just before it runs and freed right after, forward and backward), an
untied input embedding and LM head one unit each, the root holding what is left (final norm,
and a tied embedding/LM head, which must stay one tensor used at both ends of the forward; it is
freed again once the backward is below the final norm). Every parameter, gradient and optimizer state is held as a
1/world shard; gradients are reduce-scattered after every backward. With a reduced compute
precision (``actors.learner.precision``) the parameters are gathered in it and gradients reduced
in fp32 (``MixedPrecisionPolicy``) over the master shards.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (Hugging Face ``_no_split_modules`` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (_no_split_modules={sorted(names)})")
    return layers


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward instead of keeping them
    (non-reentrant checkpointing, composes with FSDP2)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def fsdp_shard(model: nn.Module, *, param_dtype: torch.dtype | None = None, cpu_offload: bool = False) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks (meta or real parameters alike).
    ``param_dtype``: gather the parameters in this dtype for compute and reduce gradients in fp32
    (mixed precision); None computes in the held dtype."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kw: dict[str, Any] = {}
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True) if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not inp.weight:
        # Untied, each end is its own unit (gathered only while it runs); a tied pair is used at
        # both ends of the forward, so it stays in the root unit with the final norm.
        for end in (inp, out):
            if end is not None:
                fully_shard(end, **kw)
    fully_shard(model, **kw)
    if out is not None and out.weight is inp.weight:
        _reshard_root_below_the_norm(model)
    return model


def _reshard_root_below_the_norm(model: nn.Module) -> None:
    """Free the gathered root unit for the decoder layers' backward.

    FSDP2 keeps the root gathered from its forward to the end of the backward. With a tied
    embedding/LM head that is a whole vocabulary × hidden weight, yet only the top of the backward
    reads the root's parameters (LM head, final norm): the embedding's backward needs the token
    ids, not the weight. So when the gradient reaches the final norm's input, the root is
    resharded; the gradients of its parameters still accumulate in their unsharded gradients,
    reduce-scattered at the end of the backward as usual. Models without a ``norm`` on their
    decoder keep FSDP2's default.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, nn.Module):
        return

    def on_norm_input(module: nn.Module, args: tuple) -> None:
        hidden = args[0] if args else None
        if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: model.reshard())

    norm.register_forward_pre_hook(on_norm_input)


def ddp_wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over all ranks. The ranks already hold identical weights (rank 0 broadcast them), so
    no start-up broadcast; buffers (rotary tables) are identical and not re-synced per forward."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, init_sync=False, forward_sync_buffers=False)


def reshard(*models: nn.Module) -> None:
    """Put every FSDP unit of ``models`` back in its sharded state (the root keeps its parameters
    gathered after a forward; state-dict reads and writes need the shards)."""
    from torch.distributed.fsdp import FSDPModule

    for model in models:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def grad_sync(train_model: nn.Module, sync: bool):
    """The context of one micro-batch's backward. DDP: gradients all-reduced only on the last
    micro-batch of a step (``sync``; the replicas' local gradients are full-size anyway). FSDP
    reduce-scatters after every micro-batch, so no rank ever holds an unsharded gradient between
    micro-batches; one process has nothing to reduce."""
    from torch.nn.parallel import DistributedDataParallel

    if sync or not isinstance(train_model, DistributedDataParallel):
        return contextlib.nullcontext()
    return train_model.no_sync()

"""The learner's models: built without weights, materialized in place, scored at completions only.

- ``weights_source``: where rank 0 streams the initial weights from; ``ref_dtype``: the
  reference's dtype.
- ``build_empty``: a Hugging Face causal LM from its config with every parameter on the meta
  device (no memory, no random init); buffers (rotary tables) are real. Dropout is off.
- ``materialize``: allocate the (possibly already sharded) parameters on a device, keeping the
  buffers and the tied embedding/LM-head sharing. The values then come from
  ``actors.learner.weights.stream.load_streamed``.
- ``completion_logp_sums``: a forward whose LM head computes log-probs of the completion tokens
  only, in chunks (``actors.learner.loss.linear_logps``): the ``[batch, length, vocab]`` logits never
  exist. The LM head still runs inside the model's own forward, so DDP and FSDP hooks see an
  ordinary forward.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from actors.hardware import IF_NATIVE, native_bf16_cpu
from actors.learner.loss import completion_targets, linear_logps, token_logps
from actors.learner.weights.stream import SafetensorsSource, StateDictSource, resolve_folder

log = logging.getLogger(__name__)

# Config fields that make a model post-process its logits (softcapping, scaling): for these the
# completion-only head would be wrong, so they are scored from full logits.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@contextlib.contextmanager
def _params_on_meta():
    """Parameters registered inside go to the meta device; buffers stay where they are made."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def no_dropout(config: Any) -> Any:
    """Zero every ``*dropout*`` probability of ``config`` (and its sub-configs); returns it."""
    for key, value in list(vars(config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
            no_dropout(value)
    return config


def ref_dtype(cfg: Any, on_gpu: bool, compute: torch.dtype) -> torch.dtype:
    """``learner.ref_dtype``, with ``auto`` = the compute dtype on GPU (bf16, or fp16 on GPUs
    without bf16), float32 on CPU (bf16 is slower there without bf16 instructions), and
    ``bfloat16_if_native`` = bf16 on a CPU that has them (``actors.hardware``), else ``auto``."""
    if cfg.ref_dtype == IF_NATIVE and not on_gpu and native_bf16_cpu():
        return torch.bfloat16
    if cfg.ref_dtype in ("auto", IF_NATIVE):
        return compute if on_gpu else torch.float32
    return getattr(torch, cfg.ref_dtype)


def weights_source(path: str, model_names: set[str]):
    """What rank 0 streams the initial weights from: the safetensors files when they hold the
    model's own tensor names; else (``.bin`` checkpoints, or checkpoints whose names transformers
    converts on load, e.g. MoE experts that transformers 5 fuses) the state dict transformers
    loads (one full copy on rank 0)."""
    folder = resolve_folder(path)
    if list(folder.glob("*.safetensors")):
        source = SafetensorsSource(folder)
        if all(name in model_names for name, _, _ in source.entries()):
            return source
        log.info("model.path %s: its tensor names differ from the model's (converted on load): "
                 "rank 0 loads it through transformers", path)
    from transformers import AutoModelForCausalLM

    return StateDictSource(AutoModelForCausalLM.from_pretrained(path).state_dict())


def build_empty(path: str, dtype: torch.dtype) -> nn.Module:
    """The model at ``path`` (HF folder or hub id) with parameters on the meta device, tied as
    its config says, every dropout off (config fields and ``nn.Dropout`` modules)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = no_dropout(AutoConfig.from_pretrained(path))
    with no_init_weights(), _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config ties inside the init that no_init_weights skips
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give ``model``'s meta parameters (or FSDP shards) uninitialized storage on ``device``.

    ``to_empty`` also empties the buffers, so they are copied back; a tie broken by it is redone.
    """
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if tied and out is not None and out.weight is not inp.weight:
        model.tie_weights()
    return model


def completion_head_ok(model: nn.Module) -> bool:
    """Whether the model's logits are exactly its LM head's output (no softcapping or scaling)."""
    config = model.config
    return model.get_output_embeddings() is not None and not any(
        getattr(config, key, None) not in (None, 0, 0.0, 1, 1.0) for key in _LOGIT_POSTPROCESSING)


@contextlib.contextmanager
def _head_computes(head: nn.Module, fn):
    head.forward = fn  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del head.forward


def completion_logp_sums(model: nn.Module, hf_model: nn.Module, batch: dict[str, torch.Tensor], *,
                     chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed completion log-probs ``[rows]`` and token counts ``[rows]``.

    ``model`` is what runs the forward (the DDP wrapper, or the FSDP/plain model itself) and
    ``hf_model`` the Hugging Face model inside it. ``batch`` holds ``input_ids``,
    ``attention_mask`` and ``completion_mask`` (``actors.learner.batching.collate``), or packed
    rows (``actors.learner.batching.pack``): then the results are per sequence, not per row.
    """
    if "sequence_ids" in batch:
        return _packed_logp_sums(model, hf_model, batch, chunk)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    select, targets, _ = completion_targets(ids, mask)
    if not completion_head_ok(hf_model):
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        sums = token_logps(logits, ids, mask).sum(-1)
    else:
        head = hf_model.get_output_embeddings()

        def head_forward(hidden: torch.Tensor) -> torch.Tensor:
            return linear_logps(hidden[:, :-1][select], head.weight, head.bias, targets, chunk)

        with _head_computes(head, head_forward):
            token = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        # Laid out as [rows, T-1] and summed per row: the same additions as the full-logits path.
        sums = torch.zeros(select.shape, dtype=token.dtype, device=token.device).masked_scatter(select, token).sum(-1)
    return sums, select.sum(-1).to(sums.dtype)


def _packed_logp_sums(model: nn.Module, hf_model: nn.Module, batch: dict[str, torch.Tensor],
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_logp_sums`` of packed rows: the model sees ``position_ids`` that restart with
    each sequence and no attention mask (transformers then masks attention across sequences); a
    position is scored when the next token is a completion token of the same sequence."""
    ids, mask, seq = batch["input_ids"], batch["completion_mask"], batch["sequence_ids"]
    select = mask[:, 1:].bool() & (seq[:, 1:] == seq[:, :-1])
    targets, owners = ids[:, 1:][select], seq[:, 1:][select]
    inputs = dict(input_ids=ids, position_ids=batch["position_ids"], use_cache=False)
    if not completion_head_ok(hf_model):
        logits = model(**inputs).logits[:, :-1][select].float()
        token = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    else:
        head = hf_model.get_output_embeddings()

        def head_forward(hidden: torch.Tensor) -> torch.Tensor:
            return linear_logps(hidden[:, :-1][select], head.weight, head.bias, targets, chunk)

        with _head_computes(head, head_forward):
            token = model(**inputs).logits
    n = int(batch["num_sequences"])
    sums = torch.zeros(n, dtype=token.dtype, device=token.device).index_add_(0, owners, token)
    lens = torch.zeros(n, dtype=token.dtype, device=token.device).index_add_(0, owners, torch.ones_like(token))
    return sums, lens

"""LoRA on the learner's policy: low-rank adapters on chosen linear layers, the base frozen.

For a target linear layer with weight W: y = W x + (α/r) · B A dropout(x), with A [r, in] and
B [out, r] (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; PEFT's
``lora.Linear``, whose semantics, initialization and file format these are). A starts
Kaiming-uniform (a = √5, as PEFT) and B at zero, so a fresh adapter leaves the model unchanged.

The factors hang under their layer as ``lora_A``/``lora_B`` (``AdapterLinear``, float32 master
weights whatever ``model.dtype`` is) and run in a forward hook, so the base model keeps its own
parameter names: the streamed load, the FSDP units (a decoder layer with its adapters) and the
checkpoint naming stay as they are. Only the factors require gradients.

The reference costs no second model: ``Adapters.view("reference")`` runs the same module with the
adapter switched off, or, when the reference is refreshed (``ref_refresh_every``), with the frozen
copy ``ref_A``/``ref_B`` taken at the last refresh (``refresh``: each rank copies its own shards).

Names and files: ``peft_name`` (the adapter's tensors as PEFT saves them), ``peft_config``
(``adapter_config.json``), ``linear_layer_names`` (what ``target_modules`` may name, read from the
model's structure on the meta device), ``base_fingerprint`` (which base an adapter belongs to).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from actors.learner.weights.stream import adapter_names, iter_full, resolve_folder, write_local

ALL_LINEAR = "all-linear"
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a module's name in ``adapter_model.safetensors``."""
FACTORS = ("lora_A", "lora_B")
REFERENCE = ("ref_A", "ref_B")


class AdapterLinear(nn.Linear):
    """One factor of an adapter (A: in -> r, B: r -> out), without bias; ``is_adapter`` marks it
    for ``actors.learner.weights.stream`` (the base model's tensors leave it out)."""

    is_adapter = True


def _head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def linear_layer_names(model: nn.Module) -> list[str]:
    """The last names of the model's linear layers (``q_proj``, ``down_proj``, ...): what
    ``learner.lora.target_modules`` may name. The LM head is not one (vLLM serves no adapter on it)."""
    head = _head(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if type(m) is nn.Linear and m is not head and name})


def check_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """``targets`` resolved to the model's linear layer names; an unknown name is a ``ValueError``
    that lists the model's linear layers."""
    names = linear_layer_names(model)
    if targets == ALL_LINEAR:
        return names
    unknown = [t for t in targets if t not in names]
    if unknown or not targets:
        raise ValueError(f"learner.lora.target_modules: {unknown or 'empty'} not among the linear layers of "
                         f"{type(model).__name__}: {names} (or all-linear)")
    return sorted(set(targets))


def meta_model(path: str) -> nn.Module:
    """The model at ``path`` built from its config on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def base_fingerprint(path: str) -> dict[str, str]:
    """Which base model an adapter was trained on: its path, a hash of its ``config.json`` (the
    keys transformers writes for itself left out) and a hash of a sample of its weights files (two
    random-weight models of one shape share a config): each file's size, its first MiB (the header)
    and 16 slices of 64 KiB spread over it. Cheap at any size; a change to a few weights may escape it."""
    folder = resolve_folder(path)
    config = json.loads((folder / "config.json").read_text())
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    weights = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        weights.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as fh:
            weights.update(fh.read(1 << 20))
            for k in range(16):
                fh.seek(size * k // 16)
                weights.update(fh.read(1 << 16))
    return {"path": str(path), "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "weights_sha256": weights.hexdigest()}


def base_mismatch(saved: dict, current: dict) -> str | None:
    """Why the base ``current`` is not the base an adapter saved with ``saved`` was trained on."""
    for key, what in (("config_sha256", "config.json"), ("weights_sha256", "weights")):
        if saved.get(key) != current.get(key):
            return (f"the adapter was trained on the base model {saved.get('path')!r}, and model.path "
                    f"{current['path']!r} is a different model (its {what} differs)")
    return None


def peft_name(name: str) -> str | None:
    """A trained factor's tensor name as PEFT saves it (``base_model.model.<module>.lora_A.weight``);
    None for the reference copy."""
    parts = name.split(".")
    return PEFT_PREFIX + name if len(parts) >= 3 and parts[-2] in FACTORS else None


class Adapters:
    """The adapters of one policy model: where they are, the view its forward runs in, their
    initialization, the reference copy and their tensors."""

    def __init__(self, model: nn.Module, cfg: Any, *, reference_copy: bool, seed: int = 0):
        self.cfg, self.seed, self.reference_copy = cfg, seed, reference_copy
        self.scaling = cfg.alpha / cfg.r
        self.targets = check_targets(model, cfg.target_modules)
        self.mode = "policy"
        """``policy`` (the trained adapter), ``base`` (none) or ``reference`` (the frozen copy, else none)."""
        self.model = model
        self.layers: dict[str, nn.Linear] = {}
        head = _head(model)
        for param in model.parameters():
            param.requires_grad_(False)
        for name, layer in list(model.named_modules()):
            if type(layer) is not nn.Linear or layer is head or name.rsplit(".", 1)[-1] not in self.targets:
                continue
            kw = dict(bias=False, device=layer.weight.device, dtype=torch.float32)
            names = FACTORS + (REFERENCE if reference_copy else ())
            for factor in names:
                a = factor.endswith("A")
                part = AdapterLinear(layer.in_features if a else cfg.r, cfg.r if a else layer.out_features, **kw)
                part.weight.requires_grad_(factor in FACTORS)
                layer.add_module(factor, part)
            layer.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
            layer.register_forward_hook(self._add_delta)
            self.layers[name] = layer

    def _add_delta(self, layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        mode = self.mode
        if mode == "base" or (mode == "reference" and not self.reference_copy):
            return out
        a, b = (layer.lora_A, layer.lora_B) if mode == "policy" else (layer.ref_A, layer.ref_B)
        x = args[0]
        if mode == "policy":
            x = layer.lora_dropout(x)
        delta = b(a(x.to(a.weight.dtype)))  # as PEFT: the input cast to the factors' dtype, the sum in the output's
        return out + (delta * self.scaling).to(out.dtype)

    @contextlib.contextmanager
    def view(self, mode: str):
        """Run the model's forward as ``mode`` (``reference``: the reference policy) inside."""
        before, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = before

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def init(self) -> None:
        """After the model is materialized: A Kaiming-uniform (a = √5, as PEFT), B zero, the same
        on every rank (each seeded by the run's seed and the layer's name; a rank writes its shard);
        the reference copy equal to them."""
        for name, layer in self.layers.items():
            digest = hashlib.sha256(f"odpo-lora-{self.seed}-{name}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            a = torch.empty(layer.lora_A.weight.shape)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            write_local(layer.lora_A.weight, a)
            write_local(layer.lora_B.weight, torch.zeros(layer.lora_B.weight.shape))
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """The reference copy := the trained adapter, each rank its own shards (no communication)."""
        if not self.reference_copy:
            return
        for layer in self.layers.values():
            for src, dst in zip(FACTORS, REFERENCE):
                s, d = getattr(layer, src).weight, getattr(layer, dst).weight
                (d.to_local() if hasattr(d, "to_local") else d).copy_(s.to_local() if hasattr(s, "to_local") else s)

    def state_names(self) -> list[str]:
        """The adapters' parameter names, reference copy included (what a checkpoint holds)."""
        return sorted(adapter_names(self.model))

    def iter_peft(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The trained factors in PEFT naming, whole on rank 0 (``None`` on the others); every rank
        iterates to the end together (a gather per tensor under FSDP)."""
        for name, t in iter_full(self.model, dtype, adapters=True):
            if (peft := peft_name(name)) is not None:
                yield peft, t

    def iter_merged(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The policy as full weights, W + (α/r)·B A for each adapted layer, in the base's names
        (``iter_full``'s order and contract): what a consumer of whole weights gets."""
        factors = {name[len(PEFT_PREFIX):]: t for name, t in self.iter_peft(torch.float32)}
        for name, t in iter_full(self.model):
            module = name.removesuffix(".weight")
            if t is not None and module in self.layers:
                delta = factors[f"{module}.lora_B.weight"] @ factors[f"{module}.lora_A.weight"]
                t = (t.float() + self.scaling * delta).to(t.dtype)
            yield name, (t.to(dtype) if t is not None and dtype is not None else t)

    def peft_config(self, base_path: str) -> dict[str, Any]:
        """``adapter_config.json`` for these adapters (loads in PEFT; vLLM serves it)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_path),
                "r": self.cfg.r, "lora_alpha": self.cfg.alpha, "lora_dropout": self.cfg.dropout,
                "target_modules": list(self.targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True}

    def save_peft(self, folder: Path, base_path: str, *, write: bool, dtype: torch.dtype | None = None) -> None:
        """Write a PEFT adapter folder (``adapter_model.safetensors``, ``adapter_config.json``) on
        rank 0 (``write``); every rank calls it (the factors are gathered)."""
        tensors = {name: t.contiguous() for name, t in self.iter_peft(dtype) if t is not None}
        if not write:
            return
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(self.peft_config(base_path), indent=2) + "\n")

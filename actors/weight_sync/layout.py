"""Pure helpers for weight sync: what the engine's model expects, checking a state dict against
it, and the byte layout of the shared-memory buffer. No Ray, no vLLM, no I/O.

Names are compared in checkpoint (Hugging Face) naming, the naming the learner uses: vLLM fuses
q/k/v and gate/up inside the engine, but its ``load_weights`` takes checkpoint names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Every tensor in the shared buffer starts on a cache-line boundary (also keeps views aligned
# for any dtype).
ALIGN = 64


class WeightMismatchError(ValueError):
    """A state dict that does not fit the engine's model; the message names the first mismatch."""


@dataclass(frozen=True)
class ParamSpec:
    """The parameters an engine's model loads: name -> shape, in checkpoint naming."""

    shapes: dict[str, tuple[int, ...]]
    optional: frozenset[str] = field(default_factory=frozenset)
    """Names a state dict may carry that the engine ignores (a tied ``lm_head.weight``)."""
    dtype: str | None = None
    """The dtype the engine serves (``"bfloat16"``): weights are cast to it before they move."""


def check_params(given: list[tuple[str, tuple[int, ...]]], spec: ParamSpec) -> list[str]:
    """The names to send, in the given order, once every name and shape fits ``spec``.

    Raises ``WeightMismatchError`` naming the first unknown name, wrong shape or missing name.
    Names in ``spec.optional`` are accepted and left out of the result.
    """
    keep: list[str] = []
    seen: set[str] = set()
    for name, shape in given:
        shape = tuple(int(s) for s in shape)
        if name in spec.optional and name not in spec.shapes:
            continue
        want = spec.shapes.get(name)
        if want is None:
            raise WeightMismatchError(
                f"weight sync: parameter {name!r} is not in the engine's model "
                f"({len(spec.shapes)} parameters, e.g. {next(iter(spec.shapes), None)!r})"
            )
        if shape != want:
            raise WeightMismatchError(
                f"weight sync: parameter {name!r} has shape {list(shape)} but the engine's model "
                f"expects {list(want)}"
            )
        if name in seen:
            raise WeightMismatchError(f"weight sync: parameter {name!r} appears twice")
        seen.add(name)
        keep.append(name)
    missing = [n for n in spec.shapes if n not in seen]
    if missing:
        raise WeightMismatchError(
            f"weight sync: parameter {missing[0]!r} is missing from the state dict "
            f"({len(missing)} of {len(spec.shapes)} missing)"
        )
    return keep


def check_dtypes(given: list[tuple[str, str]], spec: ParamSpec) -> None:
    """Raise ``WeightMismatchError`` naming the first ``(name, dtype name)`` whose dtype is not the
    engine's (a publication cast for another generator, or never cast)."""
    for name, dtype in given:
        if spec.dtype is not None and dtype != spec.dtype:
            raise WeightMismatchError(
                f"weight sync: parameter {name!r} is {dtype} but the engine serves {spec.dtype} "
                f"(generator.dtype)"
            )


def make_spec(shapes: dict[str, tuple[int, ...]], config: dict, dtype: str | None = None) -> ParamSpec:
    """The spec of a model whose checkpoint (or state dict) has ``shapes``, served in ``dtype``: a
    tied ``lm_head.weight`` is optional (checkpoints omit it, state dicts carry it, vLLM ignores it)."""
    shapes = dict(shapes)
    text_config = config.get("text_config") or {}
    if config.get("tie_word_embeddings", text_config.get("tie_word_embeddings")):
        shapes.pop("lm_head.weight", None)
        return ParamSpec(shapes, frozenset({"lm_head.weight"}), dtype)
    return ParamSpec(shapes, dtype=dtype)


def safetensors_shapes(header: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape from a parsed safetensors header (the JSON after its 8-byte length)."""
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in a flat byte buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def plan_layout(items: list[tuple[str, str, tuple[int, ...]]], start: int = 0) -> tuple[list[TensorSlot], int]:
    """Pack ``(name, dtype name, shape)`` tensors into one buffer, each aligned to ``ALIGN`` bytes,
    from byte ``start`` on (a multiple of ``ALIGN``); returns the slots and the buffer size."""
    slots, offset = [], start
    for name, dtype, shape in items:
        nbytes = dtype_of(dtype).itemsize
        for s in shape:
            nbytes *= int(s)
        slots.append(TensorSlot(name, dtype, tuple(int(s) for s in shape), offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    return slots, max(offset, ALIGN)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name is an error naming it."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


# numpy has no bfloat16: such tensors travel as same-width integers and are viewed back.
_NUMPY_CARRIER = {torch.bfloat16: torch.int16}


def numpy_carrier(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is viewed as to become a numpy array (itself unless numpy lacks it)."""
    return _NUMPY_CARRIER.get(dtype, dtype)

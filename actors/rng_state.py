"""The random number generators of one process, captured as JSON and put back.

Python's ``random``, numpy's global generator and torch's CPU generator (plus every CUDA
device's, where there are any): what a checkpoint must carry so that a resumed process draws
the same numbers an uninterrupted one would. The driver keeps its state in the checkpoint's
``loop_state.json``; each learner rank writes ``rng_rank_<k>.json`` beside its weights.
"""

from __future__ import annotations

import base64
import random
import sys
from typing import Any

FORMAT = 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def capture() -> dict[str, Any]:
    """This process's generator states as a JSON-serializable dict."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"format": FORMAT, "python": [version, list(internal), gauss]}
    if "numpy" in sys.modules:
        kind, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        state["torch"] = _b64(torch.get_rng_state().numpy().tobytes())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict[str, Any]) -> None:
    """Put back what ``capture`` returned (a part this process cannot take, e.g. CUDA states
    on a CPU-only process, is left out)."""
    if state.get("format") != FORMAT:
        raise ValueError(f"unknown RNG state format {state.get('format')!r}")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state and "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
        cuda = state.get("cuda") or []
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(
                [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in cuda])

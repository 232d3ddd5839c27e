"""vLLM's "<Layer>: Failed to load weights" lines on a weight reload, in the session's real demo
engine: for the layers that hold no checkpoint tensor (the rotary table, the tied LM head) they
are expected and kept out of the log; for any other layer they mean the engine kept old weights,
so the line reaches the log and the load fails."""

from __future__ import annotations

import logging

import pytest
from safetensors.torch import load_file
from vllm import SamplingParams

from actors.weight_sync.engine import _LAYERWISE_LOGGER, WeightLoadError, _reload
from tests.conftest import DEMO_MODEL

pytestmark = pytest.mark.integration


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def greedy(llm):
    out = llm.generate(["17+26=", "90+9="], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    return [o.outputs[0].text for o in out]


def test_expected_failed_load_lines_are_dropped_and_a_real_one_fails_the_load(demo_llm):
    tensors = sorted(load_file(str(DEMO_MODEL / "model.safetensors")).items())
    before = greedy(demo_llm)
    lines, logger = Lines(), logging.getLogger(_LAYERWISE_LOGGER)
    logger.addHandler(lines)
    try:
        demo_llm.collective_rpc(_reload, args=(tensors,))  # every checkpoint tensor: a clean load
        clean = list(lines.lines)
        lines.lines.clear()
        missing = [(n, t) for n, t in tensors if "layers.0.self_attn" not in n]  # q, k, v, o of layer 0
        with pytest.raises(WeightLoadError, match="vLLM loaded no weights into .*Linear"):
            demo_llm.collective_rpc(_reload, args=(missing,))
        broken = list(lines.lines)
    finally:
        logger.removeHandler(lines)
        demo_llm.collective_rpc(_reload, args=(tensors,))  # the session's engine as it was
    assert clean == []  # the rotary table and the tied LM head: dropped
    assert broken and all(line.endswith(": Failed to load weights") and "Rotary" not in line for line in broken)
    assert greedy(demo_llm) == before

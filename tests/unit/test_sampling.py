"""The generator's rules around the engine call: prompt tokens (plain and chat), seeds, splits,
and how a vLLM output becomes a ``Completion``."""

import math

import pytest
from transformers import AutoTokenizer
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput

from actors.generator.sampling import CPU_KV_CACHE_BYTES, encode_prompt, engine_kwargs, prompt_seed, row_prompt, \
    split_evenly, to_completion
from orchestrator.config import GeneratorConfig, ModelConfig
from tests.conftest import DEMO_MODEL


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def test_split_is_even_contiguous_and_covers_everything():
    assert split_evenly(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_prompt_seeds_never_share_a_stream_within_a_round():
    n = 8
    streams = [prompt_seed(5, p, n) + k for p in range(2000) for k in range(n)]  # vLLM: child k gets seed + k
    assert len(set(streams)) == len(streams)
    assert prompt_seed(5, 0, n) != prompt_seed(6, 0, n)
    assert all(0 <= s < 2**31 for s in streams)


def test_plain_prompts_get_bos_and_chat_prompts_the_template(tok):
    assert encode_prompt(tok, "1+2=", chat=False, position=0) == [1] + tok("1+2=", add_special_tokens=False)["input_ids"]
    chat = encode_prompt(tok, [{"role": "user", "content": "1+2="}], chat=True, position=0)
    assert chat[0] == tok.bos_token_id and tok.decode(chat[1:]) == "user: 1+2=\nassistant: "
    assert encode_prompt(tok, "1+2=", chat=True, position=0) == chat  # a bare string is one user message
    with pytest.raises(ValueError, match="row 4: prompt is a list of chat messages but model.chat_template is off"):
        encode_prompt(tok, [{"role": "user", "content": "x"}], chat=False, position=4)


def test_row_prompt_errors_name_the_row_and_field():
    assert row_prompt({"q": "hi"}, "q", 0) == "hi"
    with pytest.raises(ValueError, match=r"row 3: no prompt field 'prompt' \(has \['q'\]\)"):
        row_prompt({"q": "hi"}, "prompt", 3)
    with pytest.raises(ValueError, match=r"row 2: field 'q' must be a string or a list of chat messages, got int"):
        row_prompt({"q": 7}, "q", 2)


def output(ids, finish, stop_reason=None, logps=None):
    logps = logps or [-0.5] * len(ids)
    return CompletionOutput(index=0, text="t", token_ids=ids, cumulative_logprob=sum(logps),
                            logprobs=[{t: Logprob(lp)} for t, lp in zip(ids, logps)],
                            finish_reason=finish, stop_reason=stop_reason)


def test_token_ids_are_exactly_what_the_engine_sampled():
    # EOS sampled: kept (the learner trains it), and counted in the log-prob.
    c = to_completion(output([5, 6, 2], "stop", logps=[-0.1, -0.2, -0.3]))
    assert c.token_ids == [5, 6, 2] and c.finish_reason == "stop" and c.stop_reason is None
    assert math.isclose(c.logprob, -0.6)
    # An extra EOS id of generation_config (vLLM reports it in stop_reason): kept, nothing added.
    c = to_completion(output([5, 30], "stop", stop_reason=30))
    assert (c.token_ids, c.stop_reason) == ([5, 30], 30)
    # A stop string: every sampled token up to the one completing it (vLLM cuts only the text).
    c = to_completion(output([5, 6], "stop", stop_reason="\n"))
    assert (c.token_ids, c.stop_reason) == ([5, 6], "\n")
    c = to_completion(output([5, 6], "length"))
    assert (c.token_ids, c.finish_reason, c.stop_reason) == ([5, 6], "length", None)
    # An aborted request is its own reason (never paired), not "stop".
    assert to_completion(output([5], "abort")).finish_reason == "abort"


def test_engine_kwargs_layer_model_then_engine_section_then_extra():
    model, gen = ModelConfig(path=str(DEMO_MODEL), max_model_len=48), GeneratorConfig(engine={"enforce_eager": True})
    kwargs = engine_kwargs(model, gen, 3, on_gpu=False)
    assert kwargs["model"] == kwargs["tokenizer"] == str(DEMO_MODEL)
    assert (kwargs["max_model_len"], kwargs["seed"], kwargs["dtype"]) == (48, 3, "float32")
    assert kwargs["distributed_executor_backend"] == "uni" and kwargs["enforce_eager"] is True
    assert kwargs["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    explicit = engine_kwargs(model, GeneratorConfig(engine={"gpu_memory_utilization": 0.1}), 3, on_gpu=False)
    assert "kv_cache_memory_bytes" not in explicit


def test_cpu_tensor_parallel_workers_get_disjoint_core_groups():
    from actors.generator.sampling import cpu_thread_binding

    assert cpu_thread_binding([0, 1], 2) == "0|1"
    assert cpu_thread_binding([0, 1, 2, 3, 4], 2) == "0,1|2,3,4"
    with pytest.raises(ValueError, match="tensor_parallel_size=4 on CPU needs at least 4 cores, this actor has 2"):
        cpu_thread_binding([0, 1], 4)

"""An untied-LM-head model (as every 7B recipe model is) through DDP and 2-rank FSDP2 over gloo:
in fp32 their two rounds of steps equal one process's (FSDP also with token-budget micro-batches
of packed rows); under bf16 compute (DDP: autocast; FSDP:
bf16 parameters, fp32 gradient reduction) they stay within bf16 tolerance of it.

Two spawned ranks run ``Learner`` as a ``LearnerWorker`` would (without Ray) and hand their
weights back through a file; the single-process runs are made in this process.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from tests.conftest import DEMO_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

VOCAB = 512
# (strategy, precision, learner.max_tokens_per_micro_batch): 0 = micro-batches of 2 pairs.
SETTINGS = [("ddp", "fp32", 0), ("fsdp", "fp32", 0), ("ddp", "bf16", 0), ("fsdp", "bf16", 0), ("fsdp", "fp32", 40)]


def _pairs(n: int, offset: int = 0):
    from common.types import PreferencePair

    out = []
    for i in range(offset, offset + n):
        g = torch.Generator().manual_seed(i)
        prompt, chosen, rejected = (torch.randint(3, VOCAB, (k,), generator=g).tolist()
                                    for k in (5 + i % 6, 2 + i % 5, 3 + i % 4))
        out.append(PreferencePair("", "", "", 1.0, 0.0, prompt_token_ids=prompt, chosen_token_ids=chosen,
                                  rejected_token_ids=rejected))
    return out


def _configs(world: int, strategy: str, precision: str, path: str, tokens: int = 0):
    from orchestrator.config import LearnerConfig, ModelConfig

    learner = LearnerConfig(num_workers=world, strategy=strategy, precision=precision, batch_size=8,
                            micro_batch_size=2, max_tokens_per_micro_batch=tokens, lr=1e-3, beta=0.5,
                            logprob_chunk=8, timeout_s=600)
    return ModelConfig(path=path, tokenizer=str(DEMO_MODEL), max_model_len=64), learner


def _two_rounds(world: int, strategy: str, precision: str, path: str, tokens: int = 0) -> dict[str, torch.Tensor]:
    from actors.learner.rank import Learner

    learner = Learner(*_configs(world, strategy, precision, path, tokens))
    assert learner.model.get_output_embeddings().weight is not learner.model.get_input_embeddings().weight
    learner.train(_pairs(8), round=1)
    learner.train(_pairs(8, offset=8), round=2)
    return {k: v.clone() for k, v in learner.iter_full_state() if v is not None}


def _ranks(rank: int, world: int, port: int, path: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {f"{s}/{p}" + (f"/{t}" if t else ""): _two_rounds(world, s, p, path, t) for s, p, t in SETTINGS}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                         tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("untied")
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def results(untied_model, tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("untied_runs") / "two_ranks.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ranks, args=(2, port, str(untied_model), str(out)), nprocs=2)
    found = torch.load(out, weights_only=False)
    found["single/fp32"] = _two_rounds(1, "ddp", "fp32", str(untied_model))
    found["single/bf16"] = _two_rounds(1, "ddp", "bf16", str(untied_model))
    from safetensors.torch import load_file

    found["initial"] = load_file(str(untied_model / "model.safetensors"))
    return found


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_untied_head_ddp_and_fsdp_equal_one_process_in_fp32(results):
    assert "lm_head.weight" in results["single/fp32"]
    for run in ("ddp/fp32", "fsdp/fp32", "fsdp/fp32/40"):  # the last: packed token-budget micro-batches
        assert _max_diff(results[run], results["single/fp32"]) < 1e-5, run
    assert _max_diff(results["single/fp32"], results["initial"]) > 1e-3  # the steps moved the weights


def test_untied_head_under_bf16_compute_stays_within_bf16_tolerance(results):
    single, initial = results["single/fp32"], results["initial"]
    for run in ("single/bf16", "ddp/bf16", "fsdp/bf16"):
        got = results[run]
        assert all(t.dtype == torch.float32 for t in got.values())  # fp32 master weights
        # Each tensor's update within 25% of the fp32 update (Adam amplifies rounding), but the
        # keys' biases: their exact gradient is 0 (softmax ignores a shift shared by all keys),
        # so both runs step them by rounding noise alone.
        for k in single:
            if not k.endswith("k_proj.bias"):
                moved = (single[k] - initial[k]).norm()
                assert float((got[k] - single[k]).norm() / moved) < 0.25, (run, k)
        off = sum(float((got[k] - single[k]).norm() ** 2) for k in single) ** 0.5
        moved = sum(float((single[k] - initial[k]).norm() ** 2) for k in single) ** 0.5
        assert off / moved < 0.1, run
    # The data-parallel runs agree with one bf16 process more closely than bf16 agrees with fp32.
    for strategy in ("ddp", "fsdp"):
        assert _max_diff(results[f"{strategy}/bf16"], results["single/bf16"]) < 5e-3, strategy

"""Weight sync beyond one dense float32 engine (CPU, local Ray):

- a generator with ``tensor_parallel_size=2`` serving ``bfloat16`` while the learner keeps float32:
  its engine workers are vLLM's own processes (not Ray workers), so an object-store publication
  is fetched in the engine's process and handed to them through vLLM's RPC, and a shared-memory
  one is mapped by each worker; the cast happens on the learner (half the bytes move);
- a tiny random Mixtral, whose experts transformers 5 fuses in memory (``experts.gate_up_proj``)
  while its checkpoint and vLLM keep one tensor per expert, synced from the real learner.

Either way, after a weight change vLLM's log-probs of its own samples match transformers' on the
learner's new weights (to 1e-3 in float32, to bf16 rounding in bfloat16), and they did not before.
"""

import pytest
import ray
import torch

from actors.generator.pool import GeneratorPool
from actors.weight_sync import sync_weights
from orchestrator.config import GeneratorConfig, LearnerConfig, ModelConfig, SyncConfig
from tests.conftest import DEMO_MODEL
from tests.integration.standins import EOS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENGINE = {"enforce_eager": True, "kv_cache_memory_bytes": 32 << 20}
PROMPTS = [[1, 5, 6, 7], [1, 9, 9, 3, 4], [1, 12, 40, 22]]


def sampled_ids(c) -> list[int]:
    """The completion's tokens with the EOS that ended it (whether or not ``token_ids`` keeps it)."""
    ids = list(c.token_ids)
    if c.finish_reason == "stop" and ids[-1:] != [EOS]:
        ids.append(EOS)
    return ids


def sample_pairs(pool, seed):
    """(prompt ids, completion ids, vLLM log-prob) of n samples per prompt."""
    groups = ray.get(pool.actors[0].apply.remote(_sample_ids, PROMPTS, seed), timeout=300)
    assert len(groups) == len(PROMPTS)
    return [(p, ids, lp) for p, group in zip(PROMPTS, groups) for ids, lp in group]


def _sample_ids(actor, prompts, seed):
    # Runs in the generator actor: sample from token ids directly (the demo prompts' text is not needed).
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = actor.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                              SamplingParams(n=3, max_tokens=6, temperature=1.0, logprobs=0, seed=seed), use_tqdm=False)
    return [[(sampled_ids(c), c.cumulative_logprob) for c in o.outputs] for o in outs]


def _hf_logprob(model, prompt, completion) -> float:
    x = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = model(x).logits[0, :-1].float().log_softmax(-1)
    targets = x[0, 1:]
    return float(logps[torch.arange(len(targets)), targets][len(prompt) - 1:].sum())


def _worker_logprobs(worker, samples):
    return [_hf_logprob(worker.model, p, c) for p, c, _ in samples]


def gaps(learner, samples) -> list[float]:
    hf = ray.get(learner.rank0.apply.remote(_worker_logprobs, samples), timeout=120)
    return [abs(lp - h) for (_, _, lp), h in zip(samples, hf)]


# -- tensor parallelism 2, bfloat16 ------------------------------------------------------------


@pytest.fixture(scope="module")
def tp_pool(ray_local):
    pool = GeneratorPool(ModelConfig(path=str(DEMO_MODEL), max_model_len=64),
                         GeneratorConfig(num_actors=1, n=3, max_new_tokens=6, tensor_parallel_size=2, num_cpus=2,
                                         dtype="bfloat16", engine=ENGINE), seed=0)
    yield pool
    pool.shutdown()


@pytest.mark.parametrize("shm_dir,kind", [(None, "object_store"), ("/dev/shm", "shm")])
def test_tp2_bf16_generator_serves_the_learners_new_weights(tp_pool, stand_in_learner, shm_dir, kind):
    params = sum(torch.Size(s).numel() for s in tp_pool.param_spec.shapes.values())
    assert tp_pool.param_spec.dtype == "bfloat16"
    learner = stand_in_learner
    ray.get(learner.rank0.sgd_steps.remote(PROMPTS[tp_pool.version % 3] + [7, 7], steps=4, lr=0.1), timeout=120)
    stale = max(gaps(learner, sample_pairs(tp_pool, seed=1)))

    version = tp_pool.version + 1
    timings = sync_weights(learner, tp_pool, version, SyncConfig(shm_dir=shm_dir))
    assert tp_pool.sync_state.publication.desc["kind"] == kind and tp_pool.versions() == [version]
    assert timings["bytes"] == 2 * params  # cast to bf16 on the learner: half of float32's bytes
    assert {s.dtype for s in tp_pool.sync_state.publication.desc["slots"]} == {"bfloat16"}
    fresh = max(gaps(learner, sample_pairs(tp_pool, seed=2)))
    # bf16 weights against the learner's float32 ones: within rounding; before the sync: far off.
    assert fresh < 0.15 < 2 * 0.15 < stale, (fresh, stale)


# -- a Mixtral-shaped MoE model from the real learner --------------------------------------------


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mixtral")
    cfg = MixtralConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=64, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    MixtralForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(path)
    return path


def _perturb(worker, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in worker.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_moe_experts_reach_the_engine_under_checkpoint_names(ray_local, moe_model):
    from actors.learner.group import LearnerGroup

    model_cfg = ModelConfig(path=str(moe_model), max_model_len=64)
    pool = GeneratorPool(model_cfg, GeneratorConfig(num_actors=1, n=3, max_new_tokens=6, engine=ENGINE), seed=0)
    learner = LearnerGroup(model_cfg, LearnerConfig(num_workers=1, batch_size=4, micro_batch_size=4))
    try:
        assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in pool.param_spec.shapes
        in_memory = ray.get(learner.rank0.apply.remote(lambda w: sorted(w.model.state_dict())), timeout=60)
        assert "model.layers.1.mlp.experts.gate_up_proj" in in_memory
        ray.get(learner.rank0.apply.remote(_perturb, 1, 0.1), timeout=60)
        stale = max(gaps(learner, sample_pairs(pool, seed=1)))

        sync_weights(learner, pool, 1, SyncConfig())
        assert pool.versions() == [1]
        fresh = max(gaps(learner, sample_pairs(pool, seed=2)))
        assert fresh < 1e-3 and stale > 0.1, (fresh, stale)
    finally:
        learner.shutdown()
        pool.shutdown()

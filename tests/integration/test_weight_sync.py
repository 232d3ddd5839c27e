"""Weight sync into real vLLM engines (CPU, demo model, local Ray): after the learner's weights
change, every generator's greedy output equals transformers' on the new weights and vLLM's
log-probs match transformers' to 1e-3; a mismatched state dict fails before any weight changes; a
learner failing mid-publication leaves every engine on its last full weights; a generator killed
during a sample call is restarted, re-synced and its share re-sampled.

The learner here is ``StandInLearnerWorker`` (tests/integration/standins.py), a TEST-ONLY
stand-in for ``actors.learner``'s ``LearnerWorker`` with the same weight-sync methods
(``actors/weight_sync/base.py``); the end-to-end test with the real learner lives with the
orchestrator.
"""

import dataclasses
import os

import pytest
import ray
import torch

from actors.generator.pool import GeneratorPool
from actors.weight_sync.layout import WeightMismatchError
from actors.weight_sync import sync_weights
from orchestrator.config import GeneratorConfig, ModelConfig, SyncConfig
from tests.conftest import DEMO_MODEL
from tests.integration.standins import MAX_NEW, StandInLearner

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENGINE = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}


@pytest.fixture(scope="module")
def learner(stand_in_learner):
    return stand_in_learner


@pytest.fixture(scope="module")
def pool(ray_local):
    pool = GeneratorPool(ModelConfig(path=str(DEMO_MODEL), max_model_len=64),
                         GeneratorConfig(num_actors=2, n=4, max_new_tokens=MAX_NEW, engine=ENGINE), seed=0)
    yield pool
    files = sorted(pool.sync_state.files)
    pool.shutdown()
    assert files and not any(os.path.exists(f) for f in files), files  # shm buffers are removed


def greedy_per_actor(pool, rows) -> list[list[list[int]]]:
    """Each generator's own greedy tokens on all ``rows`` (not split), to check every engine."""
    outs = ray.get([a.sample.remote(rows, 0, True) for a in pool.actors], timeout=300)
    return [[g.completions[0].token_ids for g in groups] for groups in outs]


def prompt_ids(pool, rows):
    return [g.prompt_token_ids for g in ray.get(pool.actors[0].sample.remote(rows, 0, True), timeout=300)]


def change_weights(learner, rows, pool, step):
    text = rows[step % len(rows)]["prompt"] + "7"
    ids = prompt_ids(pool, [{"prompt": text}])[0]
    ray.get(learner.rank0.sgd_steps.remote(ids, steps=3, lr=0.05), timeout=120)


@pytest.mark.parametrize("backend,shm_dir,kind", [
    ("object_store", "/dev/shm", "shm"), ("object_store", None, "object_store"), ("disk", None, "disk")])
def test_sync_makes_every_generator_match_transformers(pool, learner, eval_rows, tmp_path, backend, shm_dir, kind):
    rows = eval_rows[:8]
    ids = prompt_ids(pool, rows)
    before = greedy_per_actor(pool, rows)
    change_weights(learner, eval_rows, pool, pool.version)
    expected = ray.get(learner.rank0.greedy.remote(ids), timeout=120)
    assert expected != before[0], "the weight change should move the greedy answers"

    version = pool.version + 1
    timings = sync_weights(learner, pool, version, SyncConfig(backend=backend, shm_dir=shm_dir), run_dir=tmp_path)
    assert pool.sync_state.publication.desc["kind"] == kind and timings["path"] == kind
    assert pool.versions() == [version, version] and pool.version == version
    assert timings["bytes"] == 4 * sum(p.numel() for p in [torch.empty(s) for s in pool.param_spec.shapes.values()])
    assert timings["total_s"] >= timings["load_s"] > 0
    assert greedy_per_actor(pool, rows) == [expected, expected]

    groups = pool.sample(rows, seed=version)
    assert {g.policy_version for g in groups} == {version}
    for prompt, group in zip(ids, groups):
        for c in group.completions:
            hf = ray.get(learner.rank0.logprob.remote(prompt, c.token_ids), timeout=60)
            assert abs(c.logprob - hf) < 1e-3, (c.token_ids, c.logprob, hf)
    if kind == "disk":
        assert [p.name for p in (tmp_path / "sync").iterdir()] == [f"weights-v{version:06d}.safetensors"]


@pytest.mark.parametrize("how,match", [
    ("name", r"parameter 'model.layers.0.mlp.gate_projj.weight' is not in the engine's model"),
    ("shape", r"parameter 'model.norm.weight' has shape \[64\] but the engine's model expects \[128\]")])
def test_mismatched_state_dict_fails_and_keeps_serving_old_weights(pool, learner, eval_rows, how, match):
    rows = eval_rows[:8]
    before, version = greedy_per_actor(pool, rows), pool.versions()
    ray.get(learner.rank0.sgd_steps.remote(prompt_ids(pool, rows[:1])[0], steps=3, lr=0.05), timeout=120)
    ray.get(learner.rank0.set_corrupt.remote(how), timeout=30)
    try:
        with pytest.raises(WeightMismatchError, match=match):
            sync_weights(learner, pool, pool.version + 1, SyncConfig())
    finally:
        ray.get(learner.rank0.set_corrupt.remote(None), timeout=30)
    assert pool.versions() == version
    assert greedy_per_actor(pool, rows) == before


def test_a_learner_failing_mid_publication_leaves_every_engine_on_its_weights(pool, learner, eval_rows):
    """A streamed shared-memory sync whose learner fails part-way: the engines have loaded the
    tensors written before the failure, then go back to the weights they last loaded in full; the
    learner's error is the one raised."""
    rows = eval_rows[:8]
    if pool.sync_state.publication is None:
        sync_weights(learner, pool, pool.version + 1, SyncConfig())
    before, versions = greedy_per_actor(pool, rows), pool.versions()
    change_weights(learner, eval_rows, pool, pool.version)  # the tensors loaded before the failure are new ones
    ray.get(learner.rank0.set_fail_after.remote(5), timeout=30)
    try:
        with pytest.raises(RuntimeError, match="gather failed at"):
            sync_weights(learner, pool, pool.version + 1, SyncConfig())
    finally:
        ray.get(learner.rank0.set_fail_after.remote(None), timeout=30)
    assert pool.versions() == versions
    assert greedy_per_actor(pool, rows) == before


def test_engine_refuses_a_mismatched_publication_before_touching_weights(pool, learner, eval_rows):
    rows = eval_rows[:8]
    if pool.sync_state.publication is None:
        sync_weights(learner, pool, pool.version + 1, SyncConfig())
    before = greedy_per_actor(pool, rows)
    desc = dict(pool.sync_state.publication.desc)
    desc["slots"] = [dataclasses.replace(s, shape=(s.shape[0] // 2, *s.shape[1:])) if s.name.endswith("o_proj.weight")
                     else s for s in desc["slots"]]
    with pytest.raises(WeightMismatchError, match=r"o_proj.weight' has shape \[64, 128\]"):
        ray.get(pool.actors[0].load_weights.remote(desc, 99), timeout=60)
    assert greedy_per_actor(pool, rows) == before
    assert pool.versions() == [pool.version] * 2


def test_killed_generator_is_restarted_resynced_and_its_share_resampled(pool, learner, eval_rows):
    rows = eval_rows[:16]
    ids = prompt_ids(pool, rows)
    change_weights(learner, eval_rows, pool, 3)
    version = pool.version + 1
    sync_weights(learner, pool, version, SyncConfig())
    expected = ray.get(learner.rank0.greedy.remote(ids), timeout=120)
    restarts = pool.restarts

    pending = pool.submit(rows, seed=0, greedy=True)
    ray.kill(pool.actors[1], no_restart=False)
    groups = pool.collect(pending)
    assert pool.restarts == restarts + 1
    assert [g.row for g in groups] == rows
    assert {g.policy_version for g in groups} == {version}
    assert [g.completions[0].token_ids for g in groups] == expected
    assert pool.versions() == [version, version]

    # A generator that serves another version (here: loaded behind the pool's back) is re-synced
    # before its share counts: a sync-mode sample never mixes versions.
    ray.get(pool.actors[0].load_weights.remote(pool.sync_state.publication.desc, version + 7), timeout=60)
    groups = pool.sample(rows, seed=0, greedy=True)
    assert {g.policy_version for g in groups} == {version}
    assert [g.completions[0].token_ids for g in groups] == expected


def test_a_publication_outlives_the_learner_that_made_it(pool, eval_rows):
    """The driver owns an object-store publication: with the learner that published it gone (a
    learner rebuild), a restarted generator still loads it."""
    rows = eval_rows[:8]
    ids = prompt_ids(pool, rows)
    doomed = StandInLearner()
    ray.get(doomed.rank0.sgd_steps.remote(ids[0] + [7], steps=3, lr=0.05), timeout=120)
    expected = ray.get(doomed.rank0.greedy.remote(ids), timeout=120)
    version = pool.version + 1
    sync_weights(doomed, pool, version, SyncConfig(shm_dir=None))
    assert pool.sync_state.publication.desc["kind"] == "object_store"
    ray.kill(doomed.rank0, no_restart=True)
    restarts = pool.restarts
    ray.kill(pool.actors[0], no_restart=False)
    groups = pool.sample(rows, seed=0, greedy=True)  # generator 0 comes back on version 0 and re-syncs
    assert pool.restarts == restarts + 1 and pool.versions() == [version, version]
    assert [g.completions[0].token_ids for g in groups] == expected
    assert greedy_per_actor(pool, rows) == [expected, expected]


def test_drain_waits_for_every_sample_in_flight_and_keeps_the_results(pool, eval_rows):
    rows = eval_rows[:8]
    pending = pool.submit(rows, seed=0, greedy=True)
    assert pool.drain() == 2
    ready, not_ready = ray.wait(list(pending.refs.values()), num_returns=2, timeout=0)
    assert len(ready) == 2 and not not_ready
    assert [g.row for g in pool.collect(pending)] == rows
    assert pool.drain() == 0

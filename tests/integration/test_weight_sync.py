"""Weight sync into real vLLM engines (CPU, demo model, local Ray): after the learner's weights
change, every generator's greedy output equals transformers' on the new weights and vLLM's
log-probs match transformers' to 1e-3; a mismatched state dict fails before any weight changes;
a generator killed during a sample call is restarted, re-synced and its share re-sampled.

The learner here is ``StandInLearnerWorker``, a TEST-ONLY stand-in for ``actors.learner``'s
``LearnerWorker`` with the same contract (``apply``, ``full_state_dict``, ``model``); the
end-to-end test with the real learner lives with the orchestrator.
"""

import dataclasses
import os

import pytest
import ray
import torch

from actors.generator import GeneratorPool
from actors.weight_layout import WeightMismatchError
from actors.weight_sync import sync_weights
from orchestrator.config import GeneratorConfig, ModelConfig, SyncConfig
from tests.conftest import DEMO_MODEL

pytestmark = pytest.mark.integration

ENGINE = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
MAX_NEW = 6
EOS = 2


@ray.remote(num_cpus=0)
class StandInLearnerWorker:
    """TEST-ONLY stand-in for the learner's rank-0 worker: the demo model in transformers."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.corrupt = None

    def apply(self, fn, *args, **kwargs):
        return fn(self, *args, **kwargs)

    def full_state_dict(self) -> dict:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.corrupt == "name":
            state["model.layers.0.mlp.gate_projj.weight"] = state.pop("model.layers.0.mlp.gate_proj.weight")
        elif self.corrupt == "shape":
            state["model.norm.weight"] = torch.ones(64)
        return state

    def set_corrupt(self, how):
        self.corrupt = how

    @torch.no_grad()
    def sgd_steps(self, ids: list[int], steps: int, lr: float) -> None:
        """A few plain SGD steps that make ``ids`` likelier: a real weight change."""
        self.model.train()
        x = torch.tensor([ids])
        for _ in range(steps):
            with torch.enable_grad():
                loss = self.model(x, labels=x).loss
                loss.backward()
            for p in self.model.parameters():
                p -= lr * p.grad
                p.grad = None
        self.model.eval()

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]]) -> list[list[int]]:
        out = []
        for ids in prompts:
            x = torch.tensor([ids])
            gen = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False,
                                      pad_token_id=0, eos_token_id=EOS)[0, len(ids):].tolist()
            out.append(gen[: gen.index(EOS) + 1] if EOS in gen else gen)  # the engine returns a sampled EOS too
        return out

    @torch.no_grad()
    def logprob(self, prompt: list[int], completion: list[int]) -> float:
        x = torch.tensor([prompt + completion])
        logps = self.model(x).logits[0, :-1].float().log_softmax(-1)
        targets = x[0, 1:]
        return float(logps[torch.arange(len(targets)), targets][len(prompt) - 1:].sum())


class StandInLearner:
    """TEST-ONLY stand-in for ``LearnerGroup``: ``workers`` and ``rank0``."""

    def __init__(self):
        self.workers = [StandInLearnerWorker.remote(str(DEMO_MODEL))]
        self.rank0 = self.workers[0]


@pytest.fixture(scope="module")
def learner(ray_local):
    group = StandInLearner()
    yield group
    for w in group.workers:
        ray.kill(w)


@pytest.fixture(scope="module")
def pool(ray_local):
    pool = GeneratorPool(ModelConfig(path=str(DEMO_MODEL), max_model_len=64),
                         GeneratorConfig(num_actors=2, n=4, max_new_tokens=MAX_NEW, engine=ENGINE), seed=0)
    yield pool
    files = sorted(pool.sync_state.get("files", ()))
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
    assert pool.publication.desc["kind"] == kind and timings["path"] == kind
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


def test_engine_refuses_a_mismatched_publication_before_touching_weights(pool, learner, eval_rows):
    rows = eval_rows[:8]
    if pool.publication is None:
        sync_weights(learner, pool, pool.version + 1, SyncConfig())
    before = greedy_per_actor(pool, rows)
    desc = dict(pool.publication.desc)
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
    ray.get(pool.actors[0].load_weights.remote(pool.publication.desc, version + 7), timeout=60)
    groups = pool.sample(rows, seed=0, greedy=True)
    assert {g.policy_version for g in groups} == {version}
    assert [g.completions[0].token_ids for g in groups] == expected

"""The learner group on a local Ray cluster: real worker actors, gloo, the demo model.

Two groups live for the whole module (1 worker, and 2 workers under DDP); each saves its initial
state once, and tests that need a fresh policy load it back.
"""

import copy
import json
import math

import pytest
import ray
import torch
from safetensors.torch import load_file

from actors.learner.group import LearnerGroup
from common.types import PreferencePair
from orchestrator.config import LearnerConfig, ModelConfig
from tests.conftest import DEMO_DATA, DEMO_MODEL
from tests.conftest import same_state as _same

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = ModelConfig(path=str(DEMO_MODEL), max_model_len=64)


def _cfg(**kw) -> LearnerConfig:
    base = dict(batch_size=16, micro_batch_size=16, lr=3e-4, beta=0.5, timeout_s=300)
    return LearnerConfig(**{**base, **kw})


def _demo_pairs(n: int) -> list[PreferencePair]:
    """Chosen = the right sum, rejected = a near miss (±1 or ±10), for the first n train prompts."""
    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()[:n]]
    deltas = [1, -1, 10, -10]
    return [PreferencePair(r["prompt"], r["answer"], str(int(r["answer"]) + deltas[i % 4]), 1.0, 0.0, r)
            for i, r in enumerate(rows)]


PAIRS = _demo_pairs(64)


@pytest.fixture(scope="module")
def one(ray_local, tmp_path_factory):
    group = LearnerGroup(MODEL, _cfg(num_workers=1), seed=0)
    init = str(tmp_path_factory.mktemp("one_init"))
    group.save(init)
    yield group, init
    group.shutdown()


@pytest.fixture(scope="module")
def two(ray_local, tmp_path_factory):
    # micro-batches of 3: each rank's 8 pairs per step take 3 forwards (3 + 3 + 2).
    group = LearnerGroup(MODEL, _cfg(num_workers=2, strategy="ddp", micro_batch_size=3, ref_refresh_every=2), seed=0)
    init = str(tmp_path_factory.mktemp("two_init"))
    group.save(init)
    yield group, init
    group.shutdown()


def _policy(w):
    return {k: v.detach().clone() for k, v in w.model.state_dict().items()}


def _reference(w):
    return {k: v.detach().clone() for k, v in w.learner.reference.state_dict().items()}


def _optimizer(w):
    rank = w.learner
    return copy.deepcopy(rank.optimizer.state_dict()), rank.scheduler.state_dict(), rank.steps, rank.skipped_steps


def _on_all(group, fn):
    return ray.get([w.apply.remote(fn) for w in group.workers], timeout=120)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)




def test_two_workers_take_the_same_step_as_one(one, two):
    (g1, init1), (g2, init2) = one, two
    g1.load(init1)
    g2.load(init2)
    r1 = g1.train(PAIRS[:16], round=1)
    r2 = g2.train(PAIRS[:16], round=1)
    assert r1["steps"] == r2["steps"] == 1 and r1["skipped_steps"] == r2["skipped_steps"] == 0
    [p1] = _on_all(g1, _policy)
    p2, p2_rank1 = _on_all(g2, _policy)
    assert _same(p2, p2_rank1)  # DDP replicas stay identical
    assert _max_diff(p1, p2) < 1e-5
    start = load_file(str(DEMO_MODEL / "model.safetensors"))
    moved = sum(int(((p1[k] - start[k]).abs() > 1e-5).sum()) for k in start) / sum(v.numel() for v in start.values())
    assert moved > 0.9  # the step moved (almost) every parameter by more than the tolerance
    for key in ("loss", "dpo_loss", "nll", "logp_chosen", "logp_rejected", "grad_norm"):
        assert r1[key] == pytest.approx(r2[key], abs=1e-5), key
    assert r1["tokens"] == r2["tokens"] == sum(2 * 7 + len(p.chosen) + len(p.rejected) + 2 for p in PAIRS[:16])


def test_twenty_steps_learn_the_preferences(one):
    group, init = one
    group.load(init)
    before = group.evaluate(PAIRS)
    reports = [group.train(PAIRS, round=r) for r in range(1, 6)]  # 64 pairs / 16 = 4 steps a round
    after = group.evaluate(PAIRS)
    assert sum(r["steps"] for r in reports) == 20
    assert before["dpo_loss"] == pytest.approx(math.log(2)) and before["reward_accuracy"] == 0.0
    assert after["reward_accuracy"] > 0.9, after
    assert after["dpo_loss"] < before["dpo_loss"] - 0.1
    assert reports[-1]["loss"] < reports[0]["loss"]
    assert reports[-1]["reward_margin"] > 0 and reports[-1]["kl"] != 0.0
    assert all(r["weights_changed"] and not r["ref_refreshed"] for r in reports)


def test_reference_refresh_copies_the_policy(two):
    group, init = two
    group.load(init)
    odd = group.train(PAIRS[:32], round=1)  # ref_refresh_every=2: round 1 keeps the reference
    assert not odd["ref_refreshed"]
    assert all(_max_diff(p, r) > 1e-4 for p, r in zip(_on_all(group, _policy), _on_all(group, _reference)))
    even = group.train(PAIRS[:32], round=2)
    assert even["ref_refreshed"]
    for policy, reference in zip(_on_all(group, _policy), _on_all(group, _reference)):
        assert _same(policy, reference)
    after = group.evaluate(PAIRS[:32])
    assert after["reward_chosen"] == after["reward_rejected"] == 0.0
    assert after["dpo_loss"] == pytest.approx(math.log(2))


def test_nan_step_is_skipped_counted_and_changes_nothing(two):
    group, _ = two
    group.train(PAIRS[:16], round=3)  # the optimizer has state to protect
    params, optim = _on_all(group, _policy), _on_all(group, _optimizer)
    group.inject_nan(1)  # rank 0 only: rank 1 must skip too
    report = group.train(PAIRS[:16], round=5)
    assert report["skipped_steps"] == 1 and report["steps"] == 0 and report["weights_changed"] is False
    assert math.isnan(report["loss"]) and math.isnan(report["grad_norm"])
    for before, after in zip(params, _on_all(group, _policy)):
        assert _same(before, after)
    for (o0, s0, steps0, skipped0), (o1, s1, steps1, skipped1) in zip(optim, _on_all(group, _optimizer)):
        assert _same(o0, o1) and _same(s0, s1) and steps1 == steps0 and skipped1 == skipped0 + 1
    # One poisoned step among two: the other one is taken.
    group.inject_nan(1)
    mixed = group.train(PAIRS[:32], round=5)
    assert (mixed["steps"], mixed["skipped_steps"], mixed["weights_changed"]) == (1, 1, True)
    assert math.isfinite(mixed["loss"])


@pytest.fixture(scope="module")
def checkpoint(two, tmp_path_factory):
    """The 2-worker group trained one round (reference != policy) and saved, with snapshots."""
    group, init = two
    group.load(init)
    group.train(PAIRS[:32], round=7)
    path = tmp_path_factory.mktemp("ckpt") / "round_7"
    group.save(str(path))
    return path, _on_all(group, _policy), _on_all(group, _reference), _on_all(group, _optimizer)


def test_save_load_round_trip_is_exact(two, checkpoint):
    group, _ = two
    path, policy, reference, optim = checkpoint
    for name in ("policy/config.json", "policy/model.safetensors", "policy/tokenizer.json",
                 "state/.metadata", "state/__0_0.distcp", "state/__1_0.distcp", "trainer.json"):
        assert (path / name).is_file(), name
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    state = json.loads((path / "trainer.json").read_text())
    assert state["steps"] == optim[0][2] and state["optimizer"] and state["world_size"] == 2
    assert _same(load_file(str(path / "policy" / "model.safetensors"))["model.norm.weight"],
                 policy[0]["model.norm.weight"])

    then = group.train(PAIRS[32:], round=9)
    assert _max_diff(_on_all(group, _policy)[0], policy[0]) > 1e-4
    group.load(str(path))
    for got, want in zip(_on_all(group, _policy), policy):
        assert _same(got, want)
    for got, want in zip(_on_all(group, _reference), reference):
        assert _same(got, want)
    for got, want in zip(_on_all(group, _optimizer), optim):
        assert _same(got, want)
    again = group.train(PAIRS[32:], round=9)  # the same round from the restored state: the same numbers
    for key in ("loss", "reward_accuracy", "grad_norm", "kl"):
        assert again[key] == then[key], key


def test_saved_policy_loads_in_vllm(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    path, policy, _, _ = checkpoint
    hf = AutoModelForCausalLM.from_pretrained(path / "policy", dtype=torch.float32).eval()
    assert _max_diff(hf.state_dict(), policy[0]) == 0.0
    tok = AutoTokenizer.from_pretrained(path / "policy")
    prompts = [p.prompt for p in PAIRS[:16]]
    ids = torch.tensor([tok(p)["input_ids"] for p in prompts])
    with torch.no_grad():
        greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    llm = LLM(model=str(path / "policy"), dtype="float32", distributed_executor_backend="uni",
              kv_cache_memory_bytes=64 << 20, max_model_len=64, seed=0)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    finally:
        del llm
    for i, out in enumerate(outs):
        got = list(out.outputs[0].token_ids)
        assert got == greedy[i, ids.shape[1]:].tolist()[: len(got)], prompts[i]


def test_fsdp_takes_the_same_step_and_round_trips(one, tmp_path):
    g1, init1 = one
    g1.load(init1)
    r1 = g1.train(PAIRS[:16], round=1)
    [p1] = _on_all(g1, _policy)
    fsdp = LearnerGroup(MODEL, _cfg(num_workers=2, strategy="fsdp", micro_batch_size=3), seed=0)
    try:
        r2 = fsdp.train(PAIRS[:16], round=1)
        full = _on_all(fsdp, lambda w: w.full_state_dict())  # a collective: every rank calls it
        assert full[1] == {}
        assert _max_diff(p1, full[0]) < 1e-5
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-6)
        fsdp.save(str(tmp_path))
        fsdp.train(PAIRS[16:32], round=2)
        fsdp.load(str(tmp_path))
        assert _same(_on_all(fsdp, lambda w: w.full_state_dict())[0], full[0])
    finally:
        fsdp.shutdown()


def test_a_slow_call_raises_timeout_naming_the_learner(one):
    group, _ = one
    patient = group.cfg
    group.cfg = patient.model_copy(update={"timeout_s": 0.01})  # the driver's wait, not the workers'
    try:
        with pytest.raises(TimeoutError, match=r"learner: train\(round=11\)"):
            group.train(PAIRS, round=11)
    finally:
        group.cfg = patient
    assert group.evaluate(PAIRS[:4])["pairs_trained"] == 4  # the worker drains the call and goes on

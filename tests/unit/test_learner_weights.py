"""Model build, streamed loading and export, and checkpoints of the learner, in one process on
the demo model (the 2-rank FSDP versions are in tests/integration/test_learner_scale.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.learner.modeling import build_empty, materialize
from actors.learner.weights import checkpoint
from actors.learner.weights.hf_folder import plan_files, write_safetensors
from actors.learner.weights.stream import SafetensorsSource, StateDictSource, iter_full, load_streamed, planned_entries
from orchestrator.config import LearnerConfig, ModelConfig
from orchestrator.rundir import checkpoint_problem
from tests.conftest import DEMO_MODEL
from tests.conftest import same_state as _same


def _plain():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)


def _filled():
    model = materialize(build_empty(str(DEMO_MODEL), torch.float32), "cpu")
    load_streamed(model, SafetensorsSource(DEMO_MODEL))
    return model


def test_meta_build_then_streamed_load_equals_a_plain_load():
    model = build_empty(str(DEMO_MODEL), torch.float32)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    materialize(model, "cpu")
    load_streamed(model, SafetensorsSource(DEMO_MODEL))
    plain = _plain()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor
    for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)  # buffers kept


def test_dropout_is_off_in_config_and_modules(tmp_path):
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    model = build_empty(str(tmp_path), torch.float32)
    assert model.config.attention_dropout == 0.0
    assert model.model.layers[0].self_attn.attention_dropout == 0.0


def test_streamed_load_names_what_does_not_fit():
    state = {k: v.clone() for k, v in _plain().state_dict().items()}
    model = materialize(build_empty(str(DEMO_MODEL), torch.float32), "cpu")
    with pytest.raises(ValueError, match=r"ckpt: tensor 'model.extra' is not in the model \(LlamaForCausalLM\)"):
        load_streamed(model, StateDictSource({**state, "model.extra": torch.zeros(1)}), where="ckpt")
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' has shape \[3\], the model's is \[128\]"):
        load_streamed(model, StateDictSource({**state, "model.norm.weight": torch.zeros(3)}))
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"parameter 'model.layers.1.mlp.up_proj.weight' is missing \(1 missing\)"):
        load_streamed(model, StateDictSource(state))


def test_iter_full_yields_each_tensor_once_in_the_asked_dtype():
    model = _filled()
    items = list(iter_full(model, torch.bfloat16))
    names = [n for n, _ in items]
    assert "lm_head.weight" not in names and names[0] == "model.embed_tokens.weight"
    assert all(t.dtype == torch.bfloat16 for _, t in items)
    assert [(n, s) for n, s, _ in planned_entries(model)] == [(n, tuple(t.shape)) for n, t in items]


def test_streamed_safetensors_writer_splits_files_and_round_trips(tmp_path):
    model = _filled()
    entries = planned_entries(model)
    files = write_safetensors(tmp_path, entries, iter_full(model), write=True, max_shard_bytes=200_000)
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    got = {}
    for f in files:
        got.update(load_file(str(tmp_path / f)))
    assert set(index["weight_map"]) == set(got) == {n for n, _, _ in entries}
    for name, t in iter_full(model):
        assert torch.equal(got[name], t), name
    assert plan_files(entries)[0][0] == "model.safetensors"  # under the default limit: one file
    with pytest.raises(ValueError, match="export: expected tensor"):
        write_safetensors(tmp_path, entries, reversed(list(iter_full(model))), write=True)


@pytest.fixture
def learner():
    from actors.learner.rank import Learner
    from common.types import PreferencePair

    learner = Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64),
                      LearnerConfig(batch_size=4, micro_batch_size=2, lr=1e-2))
    learner.train([PreferencePair(f"{i}+{i}=", str(2 * i), str(2 * i + 1), 1.0, 0.0) for i in range(10, 14)], round=1)
    return learner


def _state(learner) -> dict:
    import copy

    return {"policy": {k: v.clone() for k, v in learner.model.state_dict().items()},
            "reference": {k: v.clone() for k, v in learner.reference.state_dict().items()},
            "optimizer": copy.deepcopy(learner.optimizer.state_dict()), "steps": learner.steps}



def test_checkpoint_round_trip_and_problem_detection(learner, tmp_path):
    path = tmp_path / "round_1"
    learner.save(str(path))
    saved = _state(learner)
    assert sorted(p.name for p in path.iterdir()) == ["policy", "rng_rank_0.json", "state", "trainer.json"]
    assert json.loads((path / "trainer.json").read_text())["format"] == 2
    assert checkpoint_problem(path) is None
    policy = load_file(str(path / "policy" / "model.safetensors"))
    assert set(policy) == set(saved["policy"]) - {"lm_head.weight"}
    assert all(torch.equal(policy[k], saved["policy"][k]) for k in policy)

    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(1.0)
    learner.optimizer.state.clear()
    learner.steps = 99
    learner.load(str(path))
    assert _same(_state(learner), saved)
    assert learner.model.lm_head.weight is learner.model.model.embed_tokens.weight

    shard = path / "state" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert checkpoint_problem(path) == "state/__0_0.distcp is truncated"
    (path / "state" / ".metadata").write_bytes(b"")
    assert checkpoint_problem(path) == "state/.metadata is unreadable (EOFError)"
    (path / "trainer.json").write_text("{")
    assert checkpoint_problem(path) == "trainer.json is unreadable (JSONDecodeError)"


def test_checkpoint_saved_before_any_step_keeps_the_optimizer_fresh(tmp_path):
    from actors.learner.rank import Learner

    learner = Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64), LearnerConfig())
    learner.save(str(tmp_path / "c"))
    assert not learner.optimizer.state  # saving did not create optimizer state
    learner.load(str(tmp_path / "c"))
    assert not learner.optimizer.state and learner.steps == 0


def test_a_format_1_checkpoint_still_resumes(learner, tmp_path):
    """The layout earlier versions wrote: policy/ (HF), reference.safetensors (tied tensors once),
    optimizer.pt (format 1, optimizer keyed by parameter index)."""
    saved = _state(learner)
    path = tmp_path / "old"
    learner.model.save_pretrained(path / "policy", safe_serialization=True)
    ref = {k: v for k, v in saved["reference"].items() if k != "lm_head.weight"}
    save_file(ref, str(path / "reference.safetensors"), metadata={"aliases": json.dumps({"lm_head.weight":
                                                                                        "model.embed_tokens.weight"})})
    torch.save({"format": 1, "strategy": "ddp", "optimizer_keys": "indices", "optimizer": saved["optimizer"],
                "scheduler": learner.scheduler.state_dict(), "steps": learner.steps, "skipped_steps": 0},
               path / "optimizer.pt")
    assert checkpoint_problem(path) is None

    from actors.learner.rank import Learner

    fresh = Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64), LearnerConfig(batch_size=4, lr=1e-2))
    fresh.load(str(path))
    assert _same(_state(fresh), saved)


def test_a_folder_that_is_no_checkpoint_is_a_clear_error(learner, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing trainer.json"):
        learner.load(str(tmp_path))
    (tmp_path / "trainer.json").write_text(json.dumps({"format": 7}))
    with pytest.raises(ValueError, match="unknown format 7"):
        checkpoint.load(learner, str(tmp_path))

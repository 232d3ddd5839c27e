"""Checkpoint naming for weight sync on tiny random MoE models (Mixtral- and Qwen2-MoE-shaped):
transformers 5 fuses their experts in memory, the checkpoint files keep one tensor per expert, and
what the learner publishes must be the files' names and values; the engine's spec comes from the
files (their index when sharded), or from the config when the files are not local."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from actors.weight_sync.layout import WeightMismatchError, check_params
from actors.weight_sync.names import checkpoint_files, checkpoint_items, checkpoint_shapes, checkpoint_spec, \
    config_spec
from tests.conftest import DEMO_MODEL

SHAPE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**SHAPE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**SHAPE, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                        num_experts_per_tok=2, shared_expert_intermediate_size=24),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def moe_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(CONFIGS[request.param]()).save_pretrained(path, max_shard_size="20KB")
    return path


def files_state(path) -> dict[str, torch.Tensor]:
    state = {}
    for f in checkpoint_files(path):
        state.update(load_file(f))
    return state


def test_in_memory_names_are_fused_and_not_the_files_names(moe_dir):
    model = AutoModelForCausalLM.from_pretrained(moe_dir)
    in_memory, on_disk = set(model.state_dict()), set(files_state(moe_dir))
    assert any(n.endswith("experts.gate_up_proj") for n in in_memory)
    assert any(".experts.3." in n for n in on_disk) and not in_memory & {n for n in on_disk if ".experts." in n}
    spec = checkpoint_spec(moe_dir)
    with pytest.raises(WeightMismatchError, match="is not in the engine's model"):
        check_params([(n, tuple(t.shape)) for n, t in model.state_dict().items()], spec)


def test_published_items_are_the_checkpoint_files_names_and_values(moe_dir):
    model = AutoModelForCausalLM.from_pretrained(moe_dir)
    expected = files_state(moe_dir)
    streamed = iter(list(model.state_dict().items()))  # a one-pass stream, as the learner yields it
    got = dict(checkpoint_items(model, streamed))
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    spec = checkpoint_spec(moe_dir)
    assert check_params([(n, tuple(t.shape)) for n, t in got.items()], spec)
    assert sorted(checkpoint_shapes(model)) == sorted((n, tuple(t.shape)) for n, t in expected.items())


def test_spec_without_local_files_matches_the_files(moe_dir):
    from_files = checkpoint_spec(moe_dir, "bfloat16")
    from_config = config_spec(AutoConfig.from_pretrained(moe_dir), "bfloat16")
    assert from_config == from_files


def test_a_sharded_checkpoint_is_read_through_its_index(moe_dir):
    index = json.loads((moe_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and [f.name for f in checkpoint_files(moe_dir)] == shards
    save_file({"stray.weight": torch.zeros(2)}, moe_dir / "zz-not-in-index.safetensors")
    try:
        assert "stray.weight" not in checkpoint_spec(moe_dir).shapes  # vLLM loads what the index names
    finally:
        (moe_dir / "zz-not-in-index.safetensors").unlink()
    missing = moe_dir / shards[0]
    missing.rename(moe_dir / "moved")
    try:
        assert checkpoint_spec(moe_dir) is None  # incomplete files: the config is the fallback
    finally:
        (moe_dir / "moved").rename(missing)


def test_a_model_loaded_without_renaming_passes_through_untouched():
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    items = list(model.state_dict().items())
    assert all(a is b for (_, a), (_, b) in zip(checkpoint_items(model, iter(items)), items))
    assert list(checkpoint_items(None, iter(items[:2]))) == items[:2]

"""Weight sync without engines or a GPU: the name/shape/dtype check, the shared-buffer layout and
its round trip, the disk file, the engine's parameter spec from checkpoint files, which learner
ranks publish, and the NCCL backend's plumbing (init infos, rank offsets, the checked source and
vLLM's packed buckets over it). The NCCL session logic is in test_nccl_session.py; checkpoint
naming of MoE models in test_weight_names.py."""

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from actors import weight_sync
from actors.weight_sync.layout import ALIGN, ParamSpec, WeightMismatchError, check_dtypes, check_params, make_spec, \
    numpy_carrier, plan_layout
from actors.weight_sync import PublishRequest, disk, engine, nccl, stored
from actors.weight_sync.names import checkpoint_spec
from orchestrator.config import SyncConfig
from tests.conftest import DEMO_MODEL

SPEC = ParamSpec({"a.weight": (4, 3), "b.bias": (3,)}, frozenset({"lm_head.weight"}), "float32")


def test_check_params_keeps_order_and_drops_optional_aliases():
    given = [("b.bias", (3,)), ("lm_head.weight", (9, 9)), ("a.weight", (4, 3))]
    assert check_params(given, SPEC) == ["b.bias", "a.weight"]


@pytest.mark.parametrize("given,match", [
    ([("a.weight", (4, 3)), ("c.weight", (1,)), ("b.bias", (2,))], r"parameter 'c.weight' is not in the engine's model"),
    ([("a.weight", (3, 4)), ("b.bias", (3,))], r"parameter 'a.weight' has shape \[3, 4\] but the engine's model expects \[4, 3\]"),
    ([("a.weight", (4, 3))], r"parameter 'b.bias' is missing from the state dict \(1 of 2 missing\)"),
    ([("a.weight", (4, 3)), ("a.weight", (4, 3)), ("b.bias", (3,))], r"'a.weight' appears twice"),
])
def test_check_params_names_the_first_mismatch(given, match):
    with pytest.raises(WeightMismatchError, match=match):
        check_params(given, SPEC)


def test_a_publication_in_another_dtype_is_refused():
    check_dtypes([("a.weight", "float32")], SPEC)
    with pytest.raises(WeightMismatchError, match=r"'a.weight' is bfloat16 but the engine serves float32 \(generator.dtype\)"):
        check_dtypes([("a.weight", "bfloat16"), ("b.bias", "bfloat16")], SPEC)


def test_tied_lm_head_is_optional_and_untied_is_required():
    shapes = {"embed.weight": (8, 4), "lm_head.weight": (8, 4)}
    tied = make_spec(shapes, {"tie_word_embeddings": True})
    assert tied.shapes == {"embed.weight": (8, 4)} and tied.optional == {"lm_head.weight"}
    assert make_spec(shapes, {"tie_word_embeddings": False}).shapes == shapes


def test_checkpoint_spec_reads_the_demo_checkpoint_header():
    spec = checkpoint_spec(DEMO_MODEL, "bfloat16")
    assert spec.shapes["model.layers.0.self_attn.q_proj.weight"] == (128, 128)  # checkpoint naming, not fused qkv
    assert spec.shapes["model.layers.1.mlp.gate_proj.weight"] == (512, 128)
    assert len(spec.shapes) == 20 and spec.optional == {"lm_head.weight"} and spec.dtype == "bfloat16"
    assert engine.local_checkpoint(str(DEMO_MODEL)) == DEMO_MODEL


def test_layout_aligns_every_tensor_without_overlap():
    slots, size = plan_layout([("a", "float32", (3,)), ("b", "bfloat16", (5, 7)), ("c", "float32", ()), ("d", "int8", (0,))])
    assert [s.nbytes for s in slots] == [12, 70, 4, 0]
    assert [s.offset for s in slots] == [0, 64, 192, 256]
    assert all(s.offset % ALIGN == 0 for s in slots) and size == 256


def test_bfloat16_travels_through_numpy_as_int16():
    t = torch.randn(4, 4).to(torch.bfloat16)
    back = torch.from_numpy(t.view(numpy_carrier(t.dtype)).numpy()).view(torch.bfloat16)
    assert torch.equal(back, t)


class TinyLearner:
    """A learner rank (``weight_sync.LearnerRank``) holding ``state``: a plain module of its names
    and shapes (no transformers model: the names are already checkpoint names) whose export
    streams it tensor by tensor; rank 0 gets ``(name, tensor)``, the other ranks ``(name, None)``
    and must iterate to the end."""

    def __init__(self, state, rank=0):
        self.rank, self.consumed = rank, 0
        self.model = torch.nn.Module()  # what the plan reads: names and shapes only
        for name, tensor in state.items():
            module, attr = name.split(".")
            if not hasattr(self.model, module):
                self.model.add_module(module, torch.nn.Module())
            getattr(self.model, module).register_parameter(attr, torch.nn.Parameter(torch.empty_like(tensor)))
        self.state = state

    def iter_full_state(self, dtype=None):
        for name, tensor in self.state.items():
            self.consumed += 1
            yield name, (tensor if self.rank == 0 else None)


def publish(learner, kind, spec, path):
    """What ``LearnerWorker.publish_weights`` runs on a rank: ``(descriptor, arrays)``."""
    return weight_sync.publish_rank(learner, PublishRequest(kind, spec, path))


def demo_like_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "lm_head.weight": torch.randn(2, 2, generator=g),
            "b.bias": torch.randn(3, generator=g)}


def test_shm_buffer_round_trip_is_reused_in_place(tmp_path):
    path = str(tmp_path / "buf.bin")
    state = demo_like_state(0)
    desc, arrays = publish(TinyLearner(state), "shm", SPEC, path)
    assert arrays is None
    assert [s.name for s in desc["slots"]] == ["a.weight", "b.bias"] and desc["bytes"] == 60
    got = dict(weight_sync.open_published(desc))
    assert torch.equal(got["a.weight"], state["a.weight"]) and torch.equal(got["b.bias"], state["b.bias"])
    inode = os.stat(path).st_ino

    state2 = demo_like_state(1)
    desc2, _ = publish(TinyLearner(state2), "shm", dataclasses.replace(SPEC, dtype="bfloat16"), path)
    assert os.stat(path).st_ino == inode  # the same pages are rewritten, not a new file
    got2 = dict(weight_sync.open_published(desc2))
    assert got2["a.weight"].dtype == torch.bfloat16
    assert torch.equal(got2["a.weight"], state2["a.weight"].to(torch.bfloat16))
    assert desc2["bytes"] == 30
    assert publish(TinyLearner(state2, rank=1), "shm", SPEC, path) == (None, None)  # only rank 0 publishes


def test_a_mismatched_state_dict_writes_nothing(tmp_path):
    bad = demo_like_state(0)
    bad["b.bias"] = torch.zeros(5)
    with pytest.raises(WeightMismatchError, match=r"'b.bias' has shape \[5\]"):
        publish(TinyLearner(bad), "shm", SPEC, str(tmp_path / "buf.bin"))
    assert not (tmp_path / "buf.bin").exists()


def test_disk_publication_is_renamed_into_place(tmp_path):
    target = str(tmp_path / "weights-v000003.safetensors")
    state = demo_like_state(2)
    desc, _ = publish(TinyLearner(state), "disk", SPEC, target)
    assert os.listdir(tmp_path) == ["weights-v000003.safetensors"]
    got = dict(weight_sync.open_published(desc))
    assert torch.equal(got["a.weight"], state["a.weight"])


def test_disk_backend_needs_a_folder():
    with pytest.raises(ValueError, match="sync.disk_path: required"):
        disk.file_path(SyncConfig(backend="disk"), None, 1)


class Removing:
    """A learner whose rank 0 removes files at once (``remove_sync_files``), as Ray would run it."""

    def __init__(self):
        self.rank0 = SimpleNamespace(remove_sync_files=SimpleNamespace(remote=weight_sync.remove_files))


def test_a_disk_publication_removes_the_file_it_replaces_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "get", lambda ref, timeout, what: ref)
    files = [tmp_path / f"weights-v{v:06d}.safetensors" for v in (1, 2)]
    for f in files:
        f.write_bytes(b"x")
    old, new = (disk.DiskPublication(Removing(), v, {"kind": "disk", "bytes": 1, "path": str(f)}, 5)
                for v, f in zip((1, 2), files))
    new.release_previous(None)
    new.release_previous(new)  # the same file: kept
    new.release_previous(stored.StoredPublication(0, {"kind": "shm", "bytes": 1, "path": str(files[0])}, 5))
    assert all(f.exists() for f in files)
    new.release_previous(old)
    assert not files[0].exists() and files[1].exists()


def test_object_store_payload_is_returned_cast_once_in_slot_order():
    state = demo_like_state(3)
    desc, arrays = publish(TinyLearner(state), "object_store", dataclasses.replace(SPEC, dtype="bfloat16"), None)
    assert [s.dtype for s in desc["slots"]] == ["bfloat16", "bfloat16"] and desc["bytes"] == 30
    for slot, array in zip(desc["slots"], arrays):
        assert torch.equal(torch.from_numpy(array).view(torch.bfloat16), state[slot.name].to(torch.bfloat16))


class Group:
    def __init__(self, n, strategy):
        self.workers = [f"w{i}" for i in range(n)]
        self.rank0 = self.workers[0]
        self.cfg = SimpleNamespace(strategy=strategy)


def test_only_rank0_publishes_under_ddp_and_every_rank_under_fsdp():
    assert stored.publishing_workers(Group(2, "ddp")) == ["w0"]
    assert stored.publishing_workers(Group(2, "fsdp")) == ["w0", "w1"]
    assert stored.publishing_workers(Group(1, "fsdp")) == ["w0"]


# -- nccl: everything but the GPU --------------------------------------------------------------


def test_nccl_init_info_carries_the_bucket_size_and_group_size():
    info = nccl.nccl_trainer_init_info(SyncConfig(backend="nccl", nccl_bucket_mb=64), "10.0.0.1", 29555,
                                              num_generators=3, tp=2)
    assert (info.master_address, info.master_port, info.world_size) == ("10.0.0.1", 29555, 7)
    assert info.packed and info.packed_buffer_size_bytes == 64 << 20 and info.packed_num_buffers == 2
    assert info.is_sender and info.backend == "nccl"


def test_each_generator_gets_its_own_rank_offset():
    payload = {"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 7, "packed": True}
    infos = nccl.generator_init_infos(payload, num_generators=3, tp=2)
    assert [i["rank_offset"] for i in infos] == [1, 3, 5]
    assert all(i["world_size"] == 7 and i["master_address"] == "h" for i in infos)


def tiny_llama(tie=True):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def test_checked_source_casts_to_the_engine_dtype_and_packs_into_buckets():
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor

    model = tiny_llama()
    spec = make_spec({k: tuple(v.shape) for k, v in model.state_dict().items()}, {"tie_word_embeddings": True},
                     "bfloat16")
    source = nccl.model_source(SimpleNamespace(model=model), spec)
    meta = source.metadata()
    assert [m.name for m in meta] == [n for n, _ in model.named_parameters()]
    assert all(m.dtype == torch.bfloat16 for m in meta)

    bucket = 8 << 10  # small buckets: this model needs several
    it, chunks = iter(source), []
    while (chunk := pack_tensors(it, lambda item: item[1], bucket)) is not None:
        chunks.append(chunk)
    assert len(chunks) > 3
    received = {n: t for c in chunks for n, t in unpack_tensor(c.packed_tensor, c.names, c.shapes, c.dtypes, c.tensor_sizes)}
    assert list(received) == [m.name for m in meta]
    for name, param in model.named_parameters():
        assert torch.equal(received[name], param.detach().to(torch.bfloat16))


def test_checked_source_rejects_a_foreign_model_before_sending():
    source = nccl.model_source(SimpleNamespace(model=tiny_llama()), checkpoint_spec(DEMO_MODEL, "float32"))
    with pytest.raises(WeightMismatchError, match=r"'model.embed_tokens.weight' has shape \[64, 32\]"):
        source.metadata()


def test_engine_kwargs_enable_vllms_weight_transfer_config():
    from vllm.engine.arg_utils import EngineArgs

    from actors.generator.sampling import engine_kwargs
    from orchestrator.config import GeneratorConfig, ModelConfig

    kwargs = engine_kwargs(ModelConfig(path=str(DEMO_MODEL)), GeneratorConfig(num_gpus=1), 0, on_gpu=True,
                           extra={"weight_transfer_config": {"backend": "nccl"}})
    assert EngineArgs(**kwargs).weight_transfer_config.backend == "nccl"
    assert "kv_cache_memory_bytes" not in kwargs


def test_every_rank_iterates_the_streamed_export(tmp_path):
    state = demo_like_state(4)
    rank1 = TinyLearner(state, rank=1)
    assert publish(rank1, "shm", SPEC, str(tmp_path / "buf.bin")) == (None, None)
    assert rank1.consumed == len(state)  # took part in every gather
    desc, _ = publish(TinyLearner(state), "shm", dataclasses.replace(SPEC, dtype="bfloat16"),
                      str(tmp_path / "buf.bin"))
    got = dict(weight_sync.open_published(desc))
    assert torch.equal(got["a.weight"], state["a.weight"].to(torch.bfloat16))


def test_a_streamed_tensor_that_disagrees_with_the_plan_is_refused(tmp_path):
    state = demo_like_state(5)
    learner = TinyLearner(state)
    bad = dict(state, **{"b.bias": torch.zeros(3)})
    bad["a.weight"] = torch.zeros(5, 3)  # the stream gathers another shape than the plan declared
    learner.state = bad
    with pytest.raises(WeightMismatchError):
        publish(learner, "object_store", SPEC, None)

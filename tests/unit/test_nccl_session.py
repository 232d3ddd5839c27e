"""The NCCL backend's session logic, every branch, with fakes (NCCL cannot run here): Ray actor
handles are replaced by handles that run each call at once and log it, and vLLM's trainer-side
NCCL engine by a fake that makes the same calls on the generators (``trainer_init`` -> init on
every generator; ``send_weights`` -> start, update, finish) without a communicator. The fake pool
and learner workers offer what ``actors/weight_sync/base.py`` asks of ``GeneratorPool`` and
``LearnerWorker``; the real ``NcclPublication``, ``PoolClient``, ``model_source`` and publication
code run on top of them. Each test asserts which generators were contacted, with what, and in
what order."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from actors.generator.pool import GeneratorHung
from actors import weight_sync
from actors.weight_sync import nccl, object_store, stored
from actors.weight_sync.base import EngineGroup, SyncState
from actors.weight_sync.layout import WeightMismatchError, make_spec
from orchestrator.config import SyncConfig

LOG: list[tuple] = []


class Call:
    """What ``.remote()`` returns here: the call already ran; ``get`` hands back its result."""

    def __init__(self, fn):
        self.value, self.error = None, None
        try:
            self.value = fn()
        except BaseException as e:  # re-raised by ``get``, as Ray would
            self.error = e


def fake_get(refs, timeout, what):
    out = []
    for ref in refs if isinstance(refs, list) else [refs]:
        if ref.error is not None:
            raise ref.error
        out.append(ref.value)
    return out if isinstance(refs, list) else out[0]


class Method:
    def __init__(self, fn, returns=1):
        self.fn, self.returns = fn, returns

    def remote(self, *args, **kwargs):
        if self.returns == 1:
            return Call(lambda: self.fn(*args, **kwargs))
        call = Call(lambda: self.fn(*args, **kwargs))
        return tuple(Call(lambda k=k: call.value[k] if call.error is None else (_ for _ in ()).throw(call.error))
                     for k in range(self.returns))

    def options(self, num_returns=1):
        return Method(self.fn, num_returns)


class Handle:
    """A Ray actor handle whose calls run now, in this process."""

    def __init__(self, target, actor_id: str):
        self._target, self._actor_id = target, SimpleNamespace(hex=lambda: actor_id)

    def __getattr__(self, name):
        return Method(getattr(self._target, name))


class FakeGenerator:
    def __init__(self, name):
        self.name = name

    def weight_transfer(self, step, payload=None, version=None):
        LOG.append((self.name, step, payload["rank_offset"]) if step == "init" else (self.name, step))

    def load_weights(self, desc, version):
        LOG.append((self.name, "load", desc["kind"], version))
        return 0.01


class FakePool:
    """A ``SyncTarget`` over fake generators."""

    def __init__(self, n=3, tp=1, spec=None):
        self.actors = [Handle(FakeGenerator(f"g{i}"), f"gen-actor-{i}") for i in range(n)]
        self._pids = [100 + i for i in range(n)]
        self.tp = tp
        self.sync_state, self.param_spec = SyncState(), spec
        self.hung = None

    def engines(self):
        identity = tuple((a._actor_id.hex(), pid) for a, pid in zip(self.actors, self._pids))
        return EngineGroup(list(self.actors), self.tp, identity)

    def node_ids(self):
        return ["node"] * len(self.actors)

    def drain(self):
        LOG.append(("pool", "drain"))
        if self.hung is not None:
            raise GeneratorHung(self.hung, f"generator {self.hung} did not finish sample")
        return 0

    def restart_actor(self, i, resync=True):
        self.restart_actors([i], resync)

    def restart_actors(self, indices, resync=True):
        LOG.append(("pool", f"restart {list(indices)}"))  # side by side: one call for all
        for i in indices:
            self._pids[i] += 1000

    def load_weights(self, indices, desc, version, timeout):
        return fake_get([self.actors[i].load_weights.remote(desc, version) for i in indices], timeout, "load")


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))


class FakeLearnerWorker:
    """``LearnerWorker``'s weight-sync methods, on a worker that is its own ``LearnerRank``."""

    def __init__(self, rank, model):
        self.rank, self.model, self.nccl_sender = rank, model, None

    def iter_full_state(self, dtype=None):
        LOG.append((f"learner{self.rank}", "iter_full_state"))
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.detach()

    def publish_weights(self, request):
        return weight_sync.publish_rank(self, request)

    def node_info(self, shm_dir):
        return "node", False

    def nccl_endpoint(self, port):
        return "10.0.0.1", 29500

    def nccl_open(self, rank, sync_cfg, address, port, engines, spec):
        self.nccl_sender = nccl.open_nccl_sender(self, self.nccl_sender, rank, sync_cfg, address, port, engines, spec)

    def nccl_send(self, version):
        return nccl.send_nccl(self.nccl_sender, version)


class FakeLearner:
    def __init__(self, n=1, strategy="ddp", tag="a", model=None):
        model = model or tiny_llama()
        self.workers = [Handle(FakeLearnerWorker(r, model), f"learner-{tag}-{r}") for r in range(n)]
        self.rank0 = self.workers[0]
        self.cfg = SimpleNamespace(strategy=strategy)


class FakeTrainerEngine:
    """What vLLM's ``NCCLTrainerWeightTransferEngine`` does to the generators, minus NCCL."""

    fail_broadcast = False

    def __init__(self, info, client, source):
        self.info, self.client, self.source = info, client, source

    @classmethod
    def trainer_init(cls, info, *, client, source):
        LOG.append((f"learner{info.rank}", "trainer_init", info.world_size))
        if info.is_sender:
            client.init_weight_transfer_engine({"master_address": info.master_address, "rank_offset": 1,
                                                "world_size": info.world_size})
        return cls(info, client, source)

    def send_weights(self):
        meta = self.source.metadata()
        LOG.append((f"learner{self.info.rank}", "send"))
        if not self.info.is_sender:
            list(self.source)
            return
        self.client.start_weight_update()
        self.client.update_weights({"names": [m.name for m in meta]})
        if FakeTrainerEngine.fail_broadcast:
            raise RuntimeError("NCCL error: unhandled system error")
        sent = list(self.source)
        assert [n for n, _ in sent] == [m.name for m in meta] and all(t.dtype == torch.bfloat16 for _, t in sent)
        self.client.finish_weight_update()

    def shutdown(self):
        LOG.append((f"learner{self.info.rank}", "shutdown"))


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    LOG.clear()
    FakeTrainerEngine.fail_broadcast = False
    for module in (nccl, object_store, stored):
        monkeypatch.setattr(module, "get", fake_get)
    monkeypatch.setattr(nccl, "trainer_engine_cls", lambda: FakeTrainerEngine)
    yield


CFG = SyncConfig(backend="nccl", timeout_s=5)


def spec_of(model):
    return make_spec({k: tuple(v.shape) for k, v in model.state_dict().items()}, {"tie_word_embeddings": True},
                     "bfloat16")


def setup(n=3, tp=1, workers=1, strategy="ddp"):
    learner = FakeLearner(workers, strategy)
    pool = FakePool(n, tp, spec_of(learner.workers[0]._target.model))
    return learner, pool


def full_sync(learner, pool, version):
    publication = nccl.NcclPublication(learner, version, CFG, pool.param_spec)
    publication.apply(pool, list(range(len(pool.actors))))
    return publication


def steps(*names):
    return [(g, s) for s in ("start", "update", "finish") for g in names]


def test_first_sync_drains_then_opens_one_group_with_every_generator_then_broadcasts():
    learner, pool = setup(n=3, tp=2)
    publication = full_sync(learner, pool, 1)
    assert LOG == [("pool", "drain"), ("learner0", "trainer_init", 7),
                   ("g0", "init", 1), ("g1", "init", 3), ("g2", "init", 5),
                   ("learner0", "send"), *steps("g0", "g1", "g2")]
    assert publication.bytes == 2 * sum(p.numel() for p in learner.workers[0]._target.model.parameters())


def test_a_second_sync_reuses_the_session():
    learner, pool = setup()
    full_sync(learner, pool, 1)
    LOG.clear()
    full_sync(learner, pool, 2)
    assert LOG == [("pool", "drain"), ("learner0", "send"), *steps("g0", "g1", "g2")]


def test_resync_of_one_restarted_generator_touches_only_it_and_the_next_sync_reopens_the_group():
    learner, pool = setup()
    publication = full_sync(learner, pool, 1)
    pool._pids[1] += 1000  # generator 1 was restarted
    LOG.clear()
    publication.apply(pool, [1])
    assert LOG == [("learner0", "iter_full_state"), ("g1", "load", "object_store", 1)]  # no drain, no NCCL step
    LOG.clear()
    full_sync(learner, pool, 2)
    assert LOG == [("pool", "drain"), ("learner0", "shutdown"), ("learner0", "trainer_init", 4),
                   ("g0", "init", 1), ("g1", "init", 2), ("g2", "init", 3),
                   ("learner0", "send"), *steps("g0", "g1", "g2")]


def test_a_rebuilt_learner_reopens_the_session_and_the_old_one_is_not_contacted():
    learner, pool = setup()
    full_sync(learner, pool, 1)
    rebuilt = FakeLearner(1, tag="b", model=learner.workers[0]._target.model)
    LOG.clear()
    full_sync(rebuilt, pool, 2)
    # The new rank 0 has no transfer state: it opens a group (no "shutdown": nothing to close).
    assert LOG == [("pool", "drain"), ("learner0", "trainer_init", 4),
                   ("g0", "init", 1), ("g1", "init", 2), ("g2", "init", 3),
                   ("learner0", "send"), *steps("g0", "g1", "g2")]


def test_a_failed_broadcast_restarts_every_generator_side_by_side_and_drops_the_session():
    learner, pool = setup()
    full_sync(learner, pool, 1)
    FakeTrainerEngine.fail_broadcast = True
    LOG.clear()
    with pytest.raises(RuntimeError, match="NCCL error"):
        full_sync(learner, pool, 2)
    assert LOG == [("pool", "drain"), ("learner0", "send"), ("g0", "start"), ("g1", "start"), ("g2", "start"),
                   ("g0", "update"), ("g1", "update"), ("g2", "update"),
                   ("pool", "restart [0, 1, 2]")]  # all three at once, not one after another
    assert pool.sync_state.nccl_session is None
    FakeTrainerEngine.fail_broadcast = False
    LOG.clear()
    full_sync(learner, pool, 3)
    assert ("g0", "init", 1) in LOG and LOG[1] == ("learner0", "shutdown")


def test_a_mismatched_learner_fails_before_any_generator_is_contacted():
    learner, pool = setup()
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    wrong = FakeLearner(1, tag="c", model=other)
    with pytest.raises(WeightMismatchError, match=r"'model.embed_tokens.weight' has shape \[64, 48\]"):
        full_sync(wrong, pool, 1)
    assert LOG == [("pool", "drain")]
    assert pool.sync_state.nccl_session is None


def test_a_sample_still_running_past_its_deadline_stops_the_sync_before_any_collective():
    learner, pool = setup()
    pool.hung = 2
    with pytest.raises(GeneratorHung, match="generator 2"):
        full_sync(learner, pool, 1)
    assert LOG == [("pool", "drain")]


def test_under_fsdp_every_rank_takes_part_and_only_rank0_sends_to_generators():
    learner, pool = setup(n=2, workers=2, strategy="fsdp")
    full_sync(learner, pool, 1)
    assert LOG == [("pool", "drain"), ("learner0", "trainer_init", 3), ("g0", "init", 1), ("g1", "init", 2),
                   ("learner1", "trainer_init", 3), ("learner0", "send"), *steps("g0", "g1"), ("learner1", "send")]


def test_under_ddp_only_rank0_takes_part():
    learner, pool = setup(n=2, workers=2, strategy="ddp")
    full_sync(learner, pool, 1)
    assert not any(who == "learner1" for who, *_ in LOG)
    assert ("learner0", "send") in LOG

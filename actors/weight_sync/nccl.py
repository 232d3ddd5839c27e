"""The ``nccl`` backend (GPU clusters): vLLM's weight-transfer API
(``WeightTransferConfig(backend="nccl")``: init -> start -> update -> finish), packed into
``sync.nccl_bucket_mb`` buckets, driven by the learner's rank 0 through ``PoolClient``.

A session is one NCCL group between the learner's sender and every generator's TP workers. It is
keyed on who is in it: the learner workers' and the generator actors' identities (actor id and
process id). A full sync reuses the session while the key holds and opens a new one otherwise (a
generator restarted, or the learner was rebuilt: its new rank 0 has no transfer state).

- Before any collective, the pool is drained: no generator may be inside ``sample`` (its
  weight-transfer calls would queue behind the sample, past ``sync.timeout_s``).
- Re-syncing one restarted generator never touches the healthy ones: the learner publishes its
  weights through the object store or shared memory (``object_store``) and only that generator
  loads them. The next full sync opens a new session with everyone.
- A broadcast that fails leaves the engines mid-update: every generator is restarted and the
  session dropped.

Under DDP only rank 0 takes part; under FSDP every rank does (gathering is a collective).
"""

from __future__ import annotations

import math
import socket
import time

from actors.weight_sync import object_store
from actors.weight_sync.base import EngineGroup, LearnerRank, LearnerWorkers, Publication, SyncTarget
from actors.weight_sync.layout import ParamSpec, WeightMismatchError, check_params, dtype_of
from actors.weight_sync.names import checkpoint_items
from actors.weight_sync.stored import get, publishing_workers


def nccl_trainer_init_info(sync_cfg, address: str, port: int, num_generators: int, tp: int, rank: int = 0):
    """vLLM's trainer-side init info: one sender (rank 0) plus every generator's TP workers."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    return NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=1 + num_generators * tp,
                               packed=True, packed_buffer_size_bytes=sync_cfg.nccl_bucket_mb << 20,
                               packed_num_buffers=2, rank=rank)


def generator_init_infos(init_info: dict, num_generators: int, tp: int) -> list[dict]:
    """vLLM sends one worker init payload with ``rank_offset=1``; each generator needs its own
    offset so that its TP workers take distinct ranks in the group."""
    base = init_info["rank_offset"]
    return [{**init_info, "rank_offset": base + i * tp} for i in range(num_generators)]


class PoolClient:
    """vLLM's ``VLLMWeightSyncClient`` over the target's engines (used on the learner)."""

    def __init__(self, engines: EngineGroup, timeout_s: float):
        self.actors, self.tp = engines.actors, engines.tensor_parallel_size
        self.timeout_s, self.version = timeout_s, None

    def _all(self, step: str, payloads: list) -> None:
        get([a.weight_transfer.remote(step, p, self.version) for a, p in zip(self.actors, payloads)],
            self.timeout_s, f"generators at weight transfer step {step!r}")

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all("init", generator_init_infos(init_info, len(self.actors), self.tp))

    def start_weight_update(self) -> None:
        self._all("start", [None] * len(self.actors))

    def update_weights(self, update_info) -> None:
        self._all("update", [update_info] * len(self.actors))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish", [None] * len(self.actors))


def model_source(learner: LearnerRank, spec: ParamSpec):
    """vLLM ``WeightSource`` over the learner's policy in checkpoint naming, checked against
    ``spec`` (before anything is sent) and cast to the engine's dtype on the learner."""
    import torch
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource, materialize_full_tensor

    target = dtype_of(spec.dtype or "float32")
    model = learner.model

    def raw(meta: bool):
        for name, param in model.named_parameters():
            if meta:
                yield name, torch.empty(param.shape, dtype=param.dtype, device="meta")
            else:
                yield name, materialize_full_tensor(param.detach())  # a collective under FSDP

    class CheckedSource(WeightSource):
        def metadata(self):
            shapes = [(n, tuple(t.shape)) for n, t in checkpoint_items(model, raw(meta=True))]
            names = set(check_params(shapes, spec))
            return [ParamMeta(n, target, s) for n, s in shapes if n in names]

        def __iter__(self):
            keep = {m.name for m in self.metadata()}
            for name, tensor in checkpoint_items(model, raw(meta=False)):
                if name in keep:  # the same filter on every rank keeps FSDP gathers in step
                    yield name, tensor.to(target)

    return CheckedSource()


def trainer_engine_cls():
    """vLLM's trainer-side NCCL engine class (unit tests put a fake in its place)."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    return NCCLTrainerWeightTransferEngine


# -- on the learner's ranks (``LearnerWorker.nccl_endpoint``, ``nccl_open``, ``nccl_send``) --------


def nccl_endpoint(port: int) -> tuple[str, int]:
    """This node's IP and ``port`` (0: one free on it now), for the group's rendezvous."""
    import ray

    if not port:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def open_nccl_sender(learner: LearnerRank, previous, rank: int, sync_cfg, address: str, port: int,
                     engines: EngineGroup, spec: ParamSpec):
    """Join a new weight-transfer group with every engine (closing ``previous``, this rank's old
    sender, if any); returns vLLM's trainer-side engine, which the worker keeps for ``send_nccl``."""
    if previous is not None:
        previous.shutdown()
    source = model_source(learner, spec)
    source.metadata()  # a mismatch is an error before any generator joins a group
    info = nccl_trainer_init_info(sync_cfg, address, port, len(engines.actors), engines.tensor_parallel_size,
                                  rank=rank)
    return trainer_engine_cls().trainer_init(info, client=PoolClient(engines, sync_cfg.timeout_s), source=source)


def send_nccl(sender, version: int) -> int:
    """Broadcast the policy as ``version`` through ``sender``; returns the bytes sent."""
    sender.client.version = version
    meta = sender.source.metadata()  # raises on a mismatch before the generators start an update
    sender.send_weights()
    return sum(m.dtype.itemsize * math.prod(m.shape) for m in meta)


# -- on the driver ------------------------------------------------------------------------------


def session_key(learner: LearnerWorkers, engines: EngineGroup) -> tuple:
    """Who an NCCL session joins: the learner's workers and each engine's actor and process."""
    return tuple(w._actor_id.hex() for w in learner.workers), engines.identity


class NcclPublication(Publication):
    """The learner's weights sent over NCCL as ``version``. They live on the learner: re-applying
    them to a restarted generator publishes the learner's weights as they are now through the
    object store or shared memory (right in sync mode, where nothing trains between a sync and the
    sampling it serves; in async mode a restart mid-round serves weights a few steps newer)."""

    kind = "nccl"

    def __init__(self, learner: LearnerWorkers, version: int, sync_cfg, spec: ParamSpec):
        self.learner, self.version, self.sync_cfg, self.spec = learner, version, sync_cfg, spec
        self.bytes = 0

    def apply(self, target: SyncTarget, indices: list[int]) -> float:
        engines = target.engines()
        if sorted(indices) != list(range(len(engines.actors))):
            return self._resync(target, indices)
        cfg, state = self.sync_cfg, target.sync_state
        start = time.perf_counter()
        target.drain()  # no collective while a generator is inside ``sample``
        workers = publishing_workers(self.learner)
        key = session_key(self.learner, engines)
        if state.nccl_session != key:
            state.nccl_session = None
            address, port = get(self.learner.rank0.nccl_endpoint.remote(cfg.nccl_port), cfg.timeout_s,
                                "picking the NCCL rendezvous port")
            get([w.nccl_open.remote(r, cfg, address, port, engines, self.spec) for r, w in enumerate(workers)],
                cfg.timeout_s, "opening the NCCL weight-transfer group")
            state.nccl_session = key
        try:
            sent = get([w.nccl_send.remote(self.version) for w in workers], cfg.timeout_s,
                       f"the NCCL broadcast of weights version {self.version}")
        except WeightMismatchError:
            raise  # found before any generator started an update: nothing to undo
        except BaseException:
            # The group is unusable and the engines are left mid-update (layers on the meta
            # device): start them fresh; the next sync opens a new group.
            state.nccl_session = None
            target.restart_actors(list(range(len(engines.actors))), resync=False)
            raise
        self.bytes = sent[0]
        return time.perf_counter() - start

    def _resync(self, target: SyncTarget, indices: list[int]) -> float:
        """Bring only ``indices`` (restarted generators) to the learner's weights, off NCCL."""
        host_cfg = self.sync_cfg.model_copy(update={"backend": "object_store"})
        return object_store.publish(self.learner, target, self.version, host_cfg).apply(target, indices)

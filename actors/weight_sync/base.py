"""The weight-sync contract: what a backend publishes, what the generators offer a sync, and what
the learner offers it. ``sync_weights`` (``__init__``) runs one sync over these and nothing else.

- ``Publication``: one version of the learner's weights, loadable into any of the target's
  engines, now or (a restarted engine) later. Backends: ``object_store.py`` (with its same-node
  shared-memory path), ``disk.py``, ``nccl.py``; with LoRA, ``adapter.py`` (the adapter alone, by
  the object store's paths).
- ``SyncTarget``: what receives them (``actors.generator.pool.GeneratorPool``).
- ``LearnerRank``: one rank of the learner as this package reads it (``actors.learner.rank.Learner``).
  The learner's workers run this package's learner-side steps behind named methods, each a thin
  delegate: ``publish_weights(PublishRequest)`` (``publish_rank``), ``prepare_weight_stream``
  (``prepare_stream``), ``node_info``, ``remove_sync_files`` (``remove_files``), and for NCCL
  ``nccl_endpoint``, ``nccl_open`` (``open_nccl_sender``) and ``nccl_send`` (``send_nccl``).
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from actors.weight_sync.layout import ParamSpec, TensorSlot

if TYPE_CHECKING:
    import torch


class Publication(ABC):
    """One version of the learner's weights, published once for any engine of the target."""

    version: int
    kind: str
    """How the weights travel (``sync_weights``' ``path``): ``shm``, ``object_store``, ``disk`` or ``nccl``."""
    bytes: int = 0
    """Bytes each engine receives (for ``nccl``: known once applied)."""
    publish_s: float | None = None
    """The learner's seconds publishing; None where that is part of ``apply`` (``nccl``)."""

    @abstractmethod
    def apply(self, target: SyncTarget, indices: list[int]) -> float:
        """Load these weights into the target's engines ``indices``; returns the load's seconds."""

    def finish(self) -> None:
        """Wait until the learner has published all of it (a streamed publication loads while it
        is written); raise the learner's error, if any."""

    def release_previous(self, previous: Publication | None) -> None:
        """Every engine serves this publication now instead of ``previous``: free what only
        ``previous`` needed (the disk backend removes its file)."""


@dataclass
class SyncState:
    """What weight sync keeps on its target from one sync to the next."""

    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """Names the target's shared-memory buffers."""
    publication: Publication | None = None
    """The weights every engine last loaded: re-applied to an engine that restarts."""
    files: set[str] = field(default_factory=set)
    """Files made for this target (shared-memory buffers): removed when it shuts down (``remove_files``)."""
    nccl_session: tuple | None = None
    """Who the open NCCL group joins (learner workers, engines); None when no group is open."""


@dataclass(frozen=True)
class EngineGroup:
    """The target's engines as the learner's NCCL sender reaches them (it runs on the learner)."""

    actors: list
    """Generator actors, each with ``weight_transfer(step, payload, version)``."""
    tensor_parallel_size: int
    identity: tuple
    """Each engine's actor and process: it changes when one restarts (keys an NCCL session)."""


class SyncTarget(Protocol):
    """What the generators offer a sync (``GeneratorPool``)."""

    param_spec: ParamSpec
    """The parameters every engine loads, in checkpoint naming and the engines' dtype."""
    sync_state: SyncState

    def node_ids(self) -> list[str | None]:
        """The node each engine runs on now."""

    def load_weights(self, indices: list[int], desc: dict, version: int, timeout: float) -> list[float]:
        """Load a stored publication's descriptor into engines ``indices``; each one's seconds."""

    def load_publication(self, publication: Publication) -> float:
        """Make every engine serve ``publication`` (recovering one that dies meanwhile), then keep
        it as ``sync_state.publication``; returns seconds."""

    def engines(self) -> EngineGroup:
        """Every engine, for the NCCL weight-transfer steps."""

    def drain(self) -> int:
        """Wait until no engine is inside a sample call."""

    def restart_actor(self, i: int, resync: bool = True) -> None:
        """Replace engine ``i`` (and load ``sync_state.publication`` into it when ``resync``)."""

    def restart_actors(self, indices: list[int], resync: bool = True) -> None:
        """Replace the given engines side by side (as ``restart_actor`` each)."""


class LearnerRank(Protocol):
    """One rank of the learner (``actors.learner.rank.Learner``) as weight sync reads it."""

    rank: int
    model: torch.nn.Module
    """The unwrapped Hugging Face model (its names and shapes; FSDP shards report global shapes)."""
    adapters: Any
    """With LoRA, the policy's adapters (``actors.learner.lora.Adapters``: ``iter_peft(dtype)``,
    ``peft_config``); None for full fine-tuning."""

    def iter_full_state(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The policy tensor by tensor, whole on rank 0 (``None`` on the others); every rank
        iterates to the end (a collective under FSDP)."""


class LearnerWorkers(Protocol):
    """The learner as the driver holds it (``actors.learner.group.LearnerGroup``)."""

    workers: list
    """Worker actors, one per rank, with the named weight-sync methods (module docstring)."""
    rank0: Any
    cfg: Any
    """``cfg.strategy``: under ``fsdp`` every rank takes part in a publication (gathers);
    ``cfg.lora``: set, a version is published as an adapter."""


@dataclass(frozen=True)
class PublishRequest:
    """What the driver asks of each publishing rank (``LearnerWorker.publish_weights``)."""

    kind: str
    """``object_store``, ``shm`` or ``disk``; with LoRA ``adapter_object_store`` or ``adapter_shm``."""
    spec: ParamSpec
    """The engines' parameters and dtype: checked before a byte moves, cast to on the learner."""
    path: str | None = None
    """The shared-memory buffer or the file (``shm``, ``disk``)."""
    slots: list[TensorSlot] | None = None
    """A streamed shared-memory publication's layout (``prepare_stream``)."""
    token: int | None = None
    """A streamed publication's mark: each tensor's is set to it once written (minus it: never)."""

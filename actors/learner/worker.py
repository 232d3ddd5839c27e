"""``LearnerWorker``: the Ray actor holding one rank of the learner.

The actor starts light (no torch.distributed, no model); ``LearnerGroup`` asks rank 0 for an
address, then calls ``setup`` on every worker at once to join the process group and build the
rank's ``Learner`` (``self.learner``). Weight sync reaches the learner only through the named
methods below, each a thin delegate to ``actors.weight_sync`` (its contract:
``actors/weight_sync/base.py``). ``apply`` runs a function inside the actor (tests).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable

import ray

from actors import weight_sync
from actors.learner.fault_hooks import raise_after_steps
from actors.progress import Reporter
from actors.weight_sync.base import EngineGroup, PublishRequest
from actors.weight_sync.layout import ParamSpec


@ray.remote(max_restarts=0, max_task_retries=0)
class LearnerWorker:
    def __init__(self, model_cfg: Any, cfg: Any, seed: int, rank: int, world_size: int):
        import torch

        self.model_cfg, self.cfg, self.seed = model_cfg, cfg, seed
        self.rank, self.world_size = rank, world_size
        self.learner = None
        self.nccl_sender = None  # vLLM's trainer-side weight-transfer engine, once a group is open
        torch.set_num_threads(max(1, int(cfg.num_cpus_per_worker)))

    def master_endpoint(self) -> tuple[str, int]:
        """This node's IP and a port free on it now (rank 0 hosts the process-group rendezvous)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> bool:
        """Join torch.distributed (NCCL on GPU, gloo on CPU) and build the learner; a collective."""
        import torch
        import torch.distributed as dist

        from actors.learner.rank import Learner

        gpu = self.cfg.num_gpus_per_worker > 0
        if gpu:
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        dist.init_process_group(
            "nccl" if gpu else "gloo", init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank, world_size=self.world_size, timeout=timedelta(seconds=self.cfg.timeout_s),
        )
        self.learner = Learner(self.model_cfg, self.cfg, seed=self.seed)
        if self.rank == 0:
            self.learner.on_step = _report_steps
        return True

    # The round API (each a collective: the group calls every worker at once).

    def train(self, pairs: list, round: int, beta: float | None = None) -> dict:

        armed, self.fault_raise_after = getattr(self, "fault_raise_after", None), None
        with raise_after_steps(self.learner.optimizer, armed):
            return self.learner.train(pairs, round, beta)

    def evaluate(self, pairs: list, beta: float | None = None) -> dict:
        return self.learner.evaluate(pairs, beta)

    def save(self, path: str) -> None:
        self.learner.save(path)

    def load(self, path: str) -> None:
        self.learner.load(path)

    def set_lr(self, lr: float) -> None:
        """Train with ``lr`` as ``learner.lr`` from the next step on (a live change; a later
        ``load`` keeps it, as a resume with a changed lr does)."""
        self.cfg.lr = lr  # the Learner and its RoundSchedule hold this same config object
        if self.learner is not None:
            self.learner.schedule.apply_config()

    def inject_nan_next_step(self, steps: int = 1) -> None:
        """Fault injection: this rank's loss is NaN on its next ``steps`` optimizer steps."""
        self.learner.inject_nan(steps)

    def inject_nan_weights(self) -> None:
        """Fault injection: this rank's next optimizer step leaves a NaN in its weights."""
        self.learner.inject_nan_weights()

    def inject_raise(self, after_steps: int) -> None:
        """Fault injection: the next ``train`` raises after ``after_steps`` optimizer steps."""
        self.fault_raise_after = after_steps

    # Weight sync (actors/weight_sync/base.py): every publishing rank is called at once.

    def publish_weights(self, request: PublishRequest) -> tuple[dict | None, list | None]:
        """Publish the policy as ``request`` says; ``(descriptor, object-store arrays)`` on rank 0."""
        return weight_sync.publish_rank(self.learner, request)

    def prepare_weight_stream(self, spec: ParamSpec, path: str) -> dict:
        """Rank 0: check the policy against ``spec`` and lay out a streamed buffer at ``path``."""
        return weight_sync.prepare_stream(self.learner, spec, path)

    def node_info(self, shm_dir: str | None) -> tuple[str, bool]:
        """This worker's Ray node, and whether ``shm_dir`` exists on it."""
        return weight_sync.node_info(shm_dir)

    def remove_sync_files(self, paths: list[str]) -> None:
        """Remove old weight-sync files on this node."""
        weight_sync.remove_files(paths)

    def nccl_endpoint(self, port: int) -> tuple[str, int]:
        """This node's IP and a rendezvous port (``port``, or a free one when 0)."""
        return weight_sync.nccl_endpoint(port)

    def nccl_open(self, rank: int, sync_cfg: Any, address: str, port: int, engines: EngineGroup,
                  spec: ParamSpec) -> None:
        """Join a new NCCL weight-transfer group with every engine (closing this rank's old one)."""
        self.nccl_sender = weight_sync.open_nccl_sender(self.learner, self.nccl_sender, rank, sync_cfg, address,
                                                        port, engines, spec)

    def nccl_send(self, version: int) -> int:
        """Broadcast the policy as ``version`` over the open group; returns the bytes sent."""
        return weight_sync.send_nccl(self.nccl_sender, version)

    # For tests.

    def apply(self, fn: Callable, *args, **kwargs) -> Any:
        """Run ``fn(self, *args, **kwargs)`` inside the actor and return its result."""
        return fn(self, *args, **kwargs)

    @property
    def model(self):
        """The unwrapped HF model (not the DDP wrapper)."""
        return self.learner.model

    def full_state_dict(self) -> dict:
        """Policy tensors by HF name on CPU, full on rank 0 (a collective under FSDP)."""
        return self.learner.full_state_dict()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


_step_reporter = None


def _report_steps(round_: int, done: int, total: int) -> None:
    """Rank 0's optimizer steps of a round, as progress reports (actors/progress.py)."""
    global _step_reporter

    if done == 0 or _step_reporter is None or _step_reporter.tag != round_:
        _step_reporter = Reporter("learn", 0, round_, total)
    _step_reporter.set(done)

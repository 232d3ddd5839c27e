"""``LearnerWorker``: the Ray actor holding one rank of the learner.

The actor starts light (no torch.distributed, no model); ``LearnerGroup`` asks rank 0 for an
address, then calls ``setup`` on every worker at once to join the process group and build the
``Learner`` (``self.learner``). ``apply`` runs a function inside the actor: weight sync uses it to reach
``model`` and ``full_state_dict`` without a method per backend here.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable

import ray

from actors.learner.fault_hooks import raise_after_steps
from actors.progress import Reporter


@ray.remote(max_restarts=0, max_task_retries=0)
class LearnerWorker:
    def __init__(self, model_cfg: Any, cfg: Any, seed: int, rank: int, world_size: int):
        import torch

        self.model_cfg, self.cfg, self.seed = model_cfg, cfg, seed
        self.rank, self.world_size = rank, world_size
        self.learner = None
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

    def inject_nan_next_step(self, steps: int = 1) -> None:
        """Fault injection: this rank's loss is NaN on its next ``steps`` optimizer steps."""
        self.learner.inject_nan(steps)

    def inject_nan_weights(self) -> None:
        """Fault injection: this rank's next optimizer step leaves a NaN in its weights."""
        self.learner.inject_nan_weights()

    def inject_raise(self, after_steps: int) -> None:
        """Fault injection: the next ``train`` raises after ``after_steps`` optimizer steps."""
        self.fault_raise_after = after_steps

    # The hook for weight sync and tests.

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

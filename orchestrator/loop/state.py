"""What the loop holds between rounds: the running parts, the state a checkpoint carries, a drawn
round's samples, and the seed of each round."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from actors.weight_sync import sync_weights

if TYPE_CHECKING:  # for the annotations only: importing them here would load Ray
    from actors.generator.pool import GeneratorPool, SampleCall
    from actors.judging.pool import JudgePool
    from actors.learner.group import LearnerGroup
    from common.types import SampleGroup
    from orchestrator.config import SyncConfig


@dataclass
class Parts:
    """The running actors the loop drives (built by ``orchestrator.cli.run``)."""

    generators: GeneratorPool
    judges: JudgePool
    learner: LearnerGroup
    make_learner: Callable[[], LearnerGroup]
    """Builds a fresh learner group (after a worker died)."""
    sync_cfg: SyncConfig
    run_dir: str
    eval_judges: JudgePool | None = None
    """A second judge for evaluation (``judge`` for training when None)."""

    def sync(self, version: int) -> dict[str, Any]:
        """Make every generator serve the learner's current weights as ``version``."""
        return sync_weights(self.learner, self.generators, version, self.sync_cfg, run_dir=self.run_dir)


@dataclass
class LoopState:
    """What a checkpoint must carry to resume exactly (async mode adds the next round's samples:
    ``orchestrator.loop.carried``)."""

    round: int = 0
    policy_version: int = 0
    sampler: dict = field(default_factory=dict)
    pairs_total: int = 0
    rounds_without_pairs: int = 0
    beta: float | None = None
    """The adaptive β schedule's value for the next round (None for a fixed β or a fixed schedule)."""
    length_counts: dict = field(default_factory=dict)
    """The length guard's running counts of pairs with a longer / shorter chosen side."""
    service: dict = field(default_factory=dict)
    """Live config changes, the evaluation gate's state, rounds in a row without pairs
    (``orchestrator/service/hooks.py``)."""


@dataclass
class DrawnRound:
    """A round whose prompts are drawn and whose sampling is submitted (or done)."""

    round: int
    indices: list[int]
    """Positions of its prompts in the training set."""
    sampler_after: dict
    """The prompt cursor once these prompts were drawn."""
    call: SampleCall | Any = None
    """The generator pool's in-flight ``SampleCall`` while sampling runs."""
    groups: list[SampleGroup] | None = None
    """The samples, once collected."""


def round_seed(seed: int, round_: int) -> int:
    """The sampling (and pair-selection) seed of round ``round_`` of a run seeded ``seed``."""
    return (seed * 1_000_003 + round_ * 7_919) % (2**31 - 1)

"""The DPO learner: a group of Ray actors joined by torch.distributed (see ``group.py``).

``LearnerGroup`` is imported lazily so that ``actors.learner.batching`` and
``actors.learner.rank`` can be used without Ray being imported (tests, benches).
"""

from __future__ import annotations

__all__ = ["LearnerGroup", "LearnerWorker", "Learner"]


def __getattr__(name: str):
    if name == "LearnerGroup":
        from actors.learner.group import LearnerGroup

        return LearnerGroup
    if name == "LearnerWorker":
        from actors.learner.worker import LearnerWorker

        return LearnerWorker
    if name == "Learner":
        from actors.learner.rank import Learner

        return Learner
    raise AttributeError(name)

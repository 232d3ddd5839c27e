"""Waits for actors say what they wait for (actors/waiting.py): an actor that no node can hold
is reported as not placed, with what it asks for and what the cluster has free; one whose
constructor is running is reported as placed, with its pid. The generator pool, the learner
group and the judge pool report through it while they wait."""

import logging
import os
import time

import pytest
import ray
from ray.exceptions import GetTimeoutError

from actors import waiting
from actors.judging.pool import JudgePool
from actors.placement import PlacementError
from actors.waiting import ActorWait
from orchestrator.config import GeneratorConfig, JudgeConfig, LearnerConfig, ModelConfig
from tests.conftest import DEMO_MODEL

pytestmark = pytest.mark.integration


@ray.remote
class Slow:
    def __init__(self, seconds: float):
        time.sleep(seconds)

    def ready(self):
        return os.getpid()


def test_an_actor_no_node_can_hold_is_reported_as_not_placed_with_the_numbers(ray_local):
    big = Slow.options(num_cpus=64).remote(0)
    waiting = ActorWait([("big actor", big)], {"CPU": 64.0}, "test.timeout_s=2.5", interval_s=1.0)
    try:
        with pytest.raises(GetTimeoutError):
            waiting.get(big.ready.remote(), timeout=2.5)
    finally:
        ray.kill(big)
    assert len(waiting.reports) == 2
    total = ray.cluster_resources()["CPU"]
    for seconds, line in zip((1, 2), waiting.reports):
        head, _, free = line.partition("; the cluster has ")
        assert head == (f"still waiting after {seconds} s (limit test.timeout_s=2.5) for big actor (no process yet: not"
                        " placed, or its worker is starting): each asks for 64 CPU")
        assert free.endswith(f" of {total:g} CPU free (short of CPU)")


def test_an_actor_still_in_its_constructor_is_reported_as_placed_with_its_pid(ray_local):
    slow = Slow.options(num_cpus=0.1).remote(6)
    waiting = ActorWait([("slow actor", slow)], {"CPU": 0.1}, "test.timeout_s=120", interval_s=1.0)
    try:
        pid = waiting.get(slow.ready.remote(), timeout=120)
    finally:
        ray.kill(slow)
    # Before its worker process starts (seconds on a loaded machine) it has no pid; for the 6 s of
    # its constructor it has one.
    placed = [line for line in waiting.reports
              if f"for slow actor (placed (pid {pid}); its constructor is still running): each asks for 0.1 CPU" in line]
    assert len(placed) >= 4, waiting.reports


@pytest.mark.parametrize("kind", ["generator", "learner", "judge"])
def test_every_pool_reports_while_its_actors_wait(kind, ray_local, monkeypatch, caplog):
    monkeypatch.setattr(waiting, "INTERVAL_S", 0.5)
    with caplog.at_level(logging.WARNING, logger="actors.waiting"):
        if kind == "generator":
            from actors.generator.pool import GeneratorPool

            cfg = GeneratorConfig(num_cpus=64, start_timeout_s=2)
            with pytest.raises(PlacementError, match=r"within generator.start_timeout_s=2s: .*missing 64 CPU"):
                GeneratorPool(ModelConfig(path=str(DEMO_MODEL), max_model_len=64), cfg, max_restarts=0)
            name, limit = "generator 0 (actor id ", "generator.start_timeout_s=2"
        elif kind == "learner":
            from actors.learner.group import LearnerGroup

            with pytest.raises(PlacementError, match=r"was not placed within learner.timeout_s=2s .*missing 64 CPU"):
                LearnerGroup(ModelConfig(path=str(DEMO_MODEL)), LearnerConfig(num_cpus_per_worker=64, timeout_s=2))
            name, limit = "learner placement group of 1 x {'CPU': 64.0} (not placed yet)", "learner.timeout_s=2"
        else:
            cfg = JudgeConfig(cls="judges.verifiable:VerifiableJudge", num_cpus=64, setup_timeout_s=2)
            with pytest.raises(PlacementError, match=r"actor failed to start: .*missing 64 CPU"):
                JudgePool(cfg)
            name, limit = "judge actor 0 (no process yet: not placed, or its worker is starting)", "judge.setup_timeout_s=2"
    lines = [r.getMessage() for r in caplog.records if r.name == "actors.waiting"]
    assert len(lines) >= 2, lines
    assert all(f"(limit {limit}) for {name}" in line and "each asks for 64 CPU" in line for line in lines), lines

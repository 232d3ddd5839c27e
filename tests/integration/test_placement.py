"""Custom resources place actors, and an actor no node can hold is an error naming what is
missing, after its start timeout (no hang): generator pool, judge pool and learner group on the
session's local Ray cluster, which offers no `node_gone` resource."""

import pytest

from actors.placement import PlacementError
from orchestrator.config import GeneratorConfig, JudgeConfig, LearnerConfig, ModelConfig
from tests.conftest import DEMO_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GONE = {"node_gone": 1}
MISSING = r"missing 1 node_gone \(no node has it\); 1 alive node\(s\)"


def test_a_generator_no_node_can_hold_fails_after_its_start_timeout_naming_the_resource(ray_local):
    from actors.generator.pool import GeneratorPool

    with pytest.raises(PlacementError, match=r"generator 0 \(actor id [0-9a-f]+\) engine did not start within "
                                             r"generator.start_timeout_s=3s: no alive node offers what it needs "
                                             r"\(1 CPU, 1 node_gone\): " + MISSING):
        GeneratorPool(ModelConfig(path=str(DEMO_MODEL), max_model_len=32),
                      GeneratorConfig(num_actors=1, resources=GONE, start_timeout_s=3))


def test_a_judge_or_learner_no_node_can_hold_is_named(ray_local):
    from actors.judging.pool import JudgePool
    from actors.learner.group import LearnerGroup

    with pytest.raises(PlacementError, match=r"judge judges.verifiable:VerifiableJudge \(VerifiableJudge\): actor "
                                             r"failed to start: no alive node offers what it needs "
                                             r"\(0.5 CPU, 1 node_gone\): " + MISSING):
        JudgePool(JudgeConfig(resources=GONE, setup_timeout_s=2))
    with pytest.raises(PlacementError, match=r"learner: placement group of 1 x \{'CPU': 1.0, 'node_gone': 1.0\} was "
                                             r"not placed within learner.timeout_s=2s \(no alive node offers what it "
                                             r"needs \(1 CPU, 1 node_gone\): " + MISSING + r"\)"):
        LearnerGroup(ModelConfig(path=str(DEMO_MODEL)), LearnerConfig(resources=GONE, timeout_s=2))

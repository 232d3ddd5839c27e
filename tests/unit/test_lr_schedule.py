"""``learner.lr_schedule``: the per-round factor of ``learner.lr``, its config checks, and a Learner
(in this process, no Ray) stepping with the round's learning rate, warmup included, across a
checkpoint round trip."""

import math

import pytest

from actors.learner.optimizer import lr_factor
from orchestrator.config import ConfigError, LearnerConfig, ModelConfig, load_config
from tests.conftest import DEMO_MODEL

DEMO = "configs/demo.yaml"  # constant lr


def test_constant_is_one_every_round():
    assert {lr_factor("constant", r, 0, 0.0) for r in (0, 1, 7, 1000)} == {1.0}


def test_linear_and_cosine_go_from_one_to_the_ratio_then_stay():
    assert [lr_factor("linear", r, 5, 0.2) for r in (0, 1, 2, 3, 4, 5, 9)] == pytest.approx(
        [1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    cos = [lr_factor("cosine", r, 5, 0.0) for r in (1, 2, 3, 4, 5, 6)]
    assert cos == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0, 0.0])
    assert lr_factor("cosine", 3, 5, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)


def test_bad_schedule_arguments_name_the_field():
    with pytest.raises(ValueError, match="learner.lr_decay_rounds: must be >= 2"):
        lr_factor("linear", 1, 1, 0.0)
    with pytest.raises(ValueError, match="learner.lr_schedule: must be constant, linear or cosine"):
        lr_factor("step", 1, 5, 0.0)


def test_config_fills_the_decay_rounds_from_the_run_and_names_what_is_missing():
    c = load_config(DEMO, ["learner.lr_schedule=cosine", "loop.rounds=30"])
    assert (c.learner.lr_decay_rounds, c.learner.min_lr_ratio) == (30, 0.0)
    assert load_config(DEMO, ["learner.lr_schedule=linear", "learner.lr_decay_rounds=12"]).learner.lr_decay_rounds == 12
    assert load_config(DEMO).learner.lr_decay_rounds == 0  # constant: not filled
    with pytest.raises(ConfigError, match="learner.lr_decay_rounds: required .* when loop.rounds is 0"):
        load_config(DEMO, ["learner.lr_schedule=cosine", "loop.rounds=0"])
    with pytest.raises(ConfigError, match="learner.lr_decay_rounds: must be >= 2"):
        load_config(DEMO, ["learner.lr_schedule=cosine", "learner.lr_decay_rounds=1"])
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        load_config(DEMO, ["learner.min_lr_ratio=1.5"])


def test_the_learner_steps_with_the_round_s_rate_through_warmup_and_a_resume(tmp_path):
    from actors.learner.rank import Learner
    from common.types import PreferencePair

    cfg = LearnerConfig(lr=1e-3, lr_schedule="linear", lr_decay_rounds=5, min_lr_ratio=0.2, warmup_steps=2,
                        batch_size=2, micro_batch_size=2)
    pairs = [PreferencePair("17+26=", "43", "4", 1.0, 0.0, prompt_token_ids=[1, 21, 27, 15, 22, 26, 33],
                            chosen_token_ids=[24, 23, 2], rejected_token_ids=[24, 2])] * 2  # one step a round

    def learner():
        return Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64), cfg)

    seen = []
    first = learner()
    first.optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    reported = [first.train(pairs, round=r)["lr"] for r in (1, 2, 3)]
    # round 1: factor 1 and warmup 1/2; round 2: 0.8 at full warmup; round 3: 0.6
    assert seen == reported == pytest.approx([0.5e-3, 0.8e-3, 0.6e-3])
    assert first.evaluate(pairs)["loss"] > 0  # no step: the lr stays the round's
    assert first.optimizer.param_groups[0]["lr"] == pytest.approx(0.6e-3)
    first.save(str(tmp_path / "c"))

    again = learner()
    again.load(str(tmp_path / "c"))
    resumed = []
    again.optimizer.register_step_pre_hook(lambda opt, *_: resumed.append(opt.param_groups[0]["lr"]))
    for r in (4, 5, 6):
        first.train(pairs, round=r)
        again.train(pairs, round=r)
    assert seen[3:] == resumed == pytest.approx([0.4e-3, 0.2e-3, 0.2e-3])
    for name, p in first.model.state_dict().items():
        assert p.equal(again.model.state_dict()[name]), name

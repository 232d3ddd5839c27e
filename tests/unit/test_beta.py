"""The β schedule (orchestrator/loop/beta.py): values per round, the adaptive rule, resume, and config errors."""

import json
import math

import pytest
import yaml

from orchestrator.loop.beta import KLTargetBeta, LinearBeta, StepsBeta, beta_for_round, carry_beta, describe
from orchestrator.config import ConfigError, build_config, dump_config, load_config
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"


def beta_of(text: str):
    return load_config(DEMO, [f"learner.beta={text}"]).learner.beta


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        beta_of(text)
    return e.value.problems


def run_rounds(spec, first: int, last: int, kls: dict, carried=None) -> tuple[list[float], float | None]:
    """The β of rounds first..last as the loop computes them, with the KL of each round from ``kls``."""
    used = []
    for r in range(first, last + 1):
        beta = beta_for_round(spec, r, carried)
        used.append(beta)
        carried = carry_beta(spec, beta, kls.get(r))
    return used, carried


def test_a_number_is_every_round_s_beta():
    spec = beta_of("0.25")
    assert spec == 0.25
    assert [beta_for_round(spec, r) for r in (1, 2, 50)] == [0.25, 0.25, 0.25]
    assert carry_beta(spec, 0.25, 3.0) is None


def test_linear_goes_from_start_to_end_then_stays():
    spec = beta_of("{schedule: linear, start: 0.1, end: 0.02, rounds: 5}")
    assert isinstance(spec, LinearBeta)
    got = [beta_for_round(spec, r) for r in range(1, 8)]
    assert got == pytest.approx([0.1, 0.08, 0.06, 0.04, 0.02, 0.02, 0.02])
    assert beta_for_round(spec, 0) == pytest.approx(0.1)  # round 0 (eval only) reads as round 1
    assert describe(spec) == "linear 0.1 -> 0.02 at round 5"


def test_steps_hold_each_value_from_its_round():
    spec = beta_of("{schedule: steps, values: {0: 0.1, 3: 0.05, 6: 0.2}}")
    assert isinstance(spec, StepsBeta)
    assert [beta_for_round(spec, r) for r in range(1, 8)] == [0.1, 0.1, 0.05, 0.05, 0.05, 0.2, 0.2]
    assert [beta_for_round(beta_of("{schedule: steps, values: {1: 0.3, 2: 0.4}}"), r) for r in (1, 2, 3)] == [0.3, 0.4, 0.4]


def test_kl_target_raises_beta_above_the_target_and_lowers_it_below_within_bounds():
    spec = beta_of("{schedule: kl_target, start: 0.1, target_kl: 2.0, rate: 0.1, min_beta: 0.05, max_beta: 0.12}")
    assert isinstance(spec, KLTargetBeta)
    assert beta_for_round(spec, 1) == 0.1
    # KL 3 is 50% over the target: beta * (1 + 0.1 * 0.5); KL 8 is clipped to +100%: * 1.1, then the bound.
    assert carry_beta(spec, 0.1, 3.0) == pytest.approx(0.105)
    assert carry_beta(spec, 0.11, 8.0) == pytest.approx(0.12)
    # KL 1 is 50% under: * 0.95; a negative estimate counts as -100%: * 0.9; never below min_beta.
    assert carry_beta(spec, 0.1, 1.0) == pytest.approx(0.095)
    assert carry_beta(spec, 0.1, -4.0) == pytest.approx(0.09)
    assert carry_beta(spec, 0.052, 0.0) == pytest.approx(0.05)
    # A round without a KL estimate (no pairs) or a NaN one leaves beta where it was.
    assert carry_beta(spec, 0.1, None) == 0.1 and carry_beta(spec, 0.1, math.nan) == 0.1
    used, _ = run_rounds(spec, 1, 4, {1: 4.0, 2: 4.0, 3: 0.0})
    assert used == pytest.approx([0.1, 0.11, 0.12, 0.108])


def test_kl_target_default_bounds_are_a_tenth_and_ten_times_start():
    spec = beta_of("{schedule: kl_target, start: 0.2, target_kl: 1.0}")
    assert spec.bounds == (pytest.approx(0.02), pytest.approx(2.0)) and spec.rate == 0.1


@pytest.mark.parametrize("text", [
    "{schedule: linear, start: 0.1, end: 0.02, rounds: 6}",
    "{schedule: steps, values: {0: 0.1, 3: 0.05}}",
    "{schedule: kl_target, start: 0.1, target_kl: 1.0, rate: 0.2}",
])
def test_a_resumed_run_continues_the_schedule(text):
    """Rounds 1-3, a checkpoint (the loop state as JSON, as run.py writes it), then rounds 4-6:
    the same betas as six uninterrupted rounds."""
    spec = beta_of(text)
    kls = {1: 3.0, 2: 0.2, 3: 5.0, 4: 0.5, 5: 1.5, 6: 1.0}
    straight, _ = run_rounds(spec, 1, 6, kls)
    before, carried = run_rounds(spec, 1, 3, kls)
    saved = json.loads(json.dumps({"round": 3, "beta": carried}))
    # The resumed run reads its schedule back from the run directory's config.yaml.
    config = load_config(DEMO, [f"learner.beta={text}"])
    spec_again = build_config(yaml.safe_load(dump_config(config))).learner.beta
    assert spec_again == spec
    after, _ = run_rounds(spec_again, 4, 6, kls, carried=saved["beta"])
    assert before + after == pytest.approx(straight)
    if isinstance(spec, KLTargetBeta):
        assert len(set(straight)) == 6  # it really adapted every round


def test_bad_schedules_name_the_field():
    assert problems("-1") == ["learner.beta: must be > 0.0"]
    assert problems(".inf") == ["learner.beta: must be finite"]
    assert problems("{schedule: linear, start: 0.1}") == [
        "learner.beta.linear.end: required", "learner.beta.linear.rounds: required"]
    assert problems("{schedule: linear, start: 0.1, end: 0, rounds: 1, speed: 2}") == [
        "learner.beta.linear.end: must be > 0.0", "learner.beta.linear.rounds: must be >= 2",
        "learner.beta.linear.speed: unknown key"]
    assert problems("{schedule: steps, values: {5: 0.1}}") == [
        "learner.beta.steps.values: needs a value for round 0 or 1 (the first key is 5)"]
    assert problems("{schedule: steps, values: {0: -0.1}}") == ["learner.beta.steps.values.0: must be > 0.0"]
    assert problems("{schedule: kl_target, start: 0.1}") == ["learner.beta.kl_target.target_kl: required"]
    assert problems("{schedule: kl_target, start: 0.1, target_kl: 1, rate: 2}") == [
        "learner.beta.kl_target.rate: must be <= 1.0"]
    assert problems("{schedule: kl_target, start: 0.1, target_kl: 1, min_beta: 0.2}") == [
        "learner.beta.kl_target: start: 0.1 is outside [min_beta, max_beta] = [0.2, 1.0]"]
    unknown = "learner.beta: must be a number or a schedule with 'schedule' one of linear, steps, kl_target"
    assert problems("{schedule: cosine, start: 0.1}") == [unknown]
    assert problems("{start: 0.1}") == [unknown]


def test_validate_names_a_bad_schedule_field(capsys):
    from orchestrator.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["validate", str(DEMO), "--set", "learner.beta={schedule: linear, start: 0.1, end: 0.02}"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: learner.beta.linear.rounds: required"


def test_the_learner_uses_the_beta_each_call_gives_it():
    """A Learner in this process (no Ray): a scheduled learner.beta needs the round's β; the
    implicit rewards scale with the β given."""
    from actors.learner.rank import Learner
    from common.types import PreferencePair
    from orchestrator.config import LearnerConfig, ModelConfig
    from tests.conftest import DEMO_MODEL

    cfg = LearnerConfig(beta={"schedule": "linear", "start": 0.1, "end": 0.02, "rounds": 5}, batch_size=4,
                        micro_batch_size=4, lr=1e-3)
    learner = Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64), cfg)
    pairs = [PreferencePair("17+26=", "43", "4", 1.0, 0.0, prompt_token_ids=[1, 21, 27, 15, 22, 26, 33],
                            chosen_token_ids=[24, 23, 2], rejected_token_ids=[24, 2])] * 4
    with pytest.raises(ValueError, match="learner.beta is a schedule"):
        learner.evaluate(pairs)
    assert learner.train(pairs, round=1, beta=0.1)["beta"] == 0.1
    low, high = learner.evaluate(pairs, beta=0.2), learner.evaluate(pairs, beta=0.4)
    assert high["reward_margin"] == pytest.approx(2 * low["reward_margin"]) and abs(low["reward_margin"]) > 1e-4

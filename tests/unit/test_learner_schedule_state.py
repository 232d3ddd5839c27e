"""What a learner carries from round to round and across a checkpoint: the reference refresh is
keyed to rounds (a scheduled round without pairs moves it to the next round that trains, not a
period later), and the optimizer settings in force after a resume are the config's, not the
checkpoint's (``--resume --allow-config-change``)."""

from __future__ import annotations

import pytest
import torch

from common.types import PreferencePair
from orchestrator.config import LearnerConfig, ModelConfig
from tests.conftest import DEMO_MODEL

PAIR = dict(prompt_token_ids=[1, 21, 27, 15, 22, 26, 33], chosen_token_ids=[24, 23, 2], rejected_token_ids=[24, 2])


def _pairs(n=2):
    return [PreferencePair("17+26=", "43", "4", 1.0, 0.0, **PAIR) for _ in range(n)]


def _learner(**kw):
    from actors.learner.rank import Learner

    cfg = LearnerConfig(**{"lr": 1e-3, "batch_size": 2, "micro_batch_size": 2, "beta": 0.5, **kw})
    return Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64), cfg)


def _same_models(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_refresh_round_without_pairs_refreshes_at_the_next_round_that_trains(tmp_path):
    learner = _learner(ref_refresh_every=2)
    assert learner.train(_pairs(), round=1)["ref_refreshed"] is False
    # Round 2 had no pairs: the loop never called train. Round 3 is the first training after it.
    report = learner.train(_pairs(), round=3)
    assert report["ref_refreshed"] is True and _same_models(learner.model, learner.reference)
    assert learner.train(_pairs(), round=4)["ref_refreshed"] is True  # round 4's own refresh
    assert learner.train(_pairs(), round=5)["ref_refreshed"] is False
    learner.save(str(tmp_path / "ckpt"))
    again = _learner(ref_refresh_every=2)
    again.load(str(tmp_path / "ckpt"))
    assert again.refreshed_through == 4
    assert again.train(_pairs(), round=6)["ref_refreshed"] is True


def test_a_resume_trains_with_the_configured_lr_weight_decay_and_betas(tmp_path):
    first = _learner(lr=1e-3, weight_decay=0.0)
    first.train(_pairs(), round=1)
    first.save(str(tmp_path / "ckpt"))
    resumed = _learner(lr=2e-4, weight_decay=0.1, betas=(0.8, 0.99))
    resumed.load(str(tmp_path / "ckpt"))
    report = resumed.train(_pairs(), round=2)
    assert report["lr"] == pytest.approx(2e-4)
    group = resumed.optimizer.param_groups[0]
    assert (group["weight_decay"], tuple(group["betas"])) == (0.1, (0.8, 0.99))
    # Unchanged settings resume exactly as saved.
    same = _learner(lr=1e-3, weight_decay=0.0)
    same.load(str(tmp_path / "ckpt"))
    assert same.train(_pairs(), round=2)["lr"] == pytest.approx(1e-3)


def test_betas_must_be_below_one():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="betas"):
        LearnerConfig(betas=(0.9, 1.0))

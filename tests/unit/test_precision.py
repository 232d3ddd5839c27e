"""The learner's precision policy on CPU: bf16 and fp16 compute over fp32 master weights, dynamic
loss scaling, fp16 master weights refused, and a step that makes a weight non-finite never kept."""

from __future__ import annotations

import pytest
import torch

from actors.learner.precision import LossScaler, NonFiniteWeights, all_finite, compute_dtype
from orchestrator.config import ConfigError, LearnerConfig, ModelConfig, load_config
from tests.conftest import DEMO_MODEL

DEMO = "configs/demo.yaml"
PAIR_IDS = dict(prompt_token_ids=[1, 21, 27, 15, 22, 26, 33], chosen_token_ids=[24, 23, 2], rejected_token_ids=[24, 2])


def _pairs(n=8):
    from common.types import PreferencePair

    return [PreferencePair("17+26=", "43", "4", 1.0, 0.0, **PAIR_IDS) for _ in range(n)]


def _learner(**kw):
    from actors.learner.rank import Learner

    cfg = LearnerConfig(**{"lr": 1e-3, "batch_size": 4, "micro_batch_size": 2, "beta": 0.5, **kw})
    return Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64), cfg)


def _weights(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


def test_compute_dtype_follows_the_setting_and_auto_is_fp32_on_cpu():
    cpu = torch.device("cpu")
    assert compute_dtype("auto", cpu) == torch.float32
    assert [compute_dtype(p, cpu) for p in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16, torch.float16]


def test_loss_scaler_halves_on_overflow_doubles_after_good_steps_and_round_trips():
    s = LossScaler(True, init_scale=1024.0, growth_interval=3)
    assert float(s.scale_loss(torch.tensor(2.0))) == 2048.0
    s.update(overflow=True)
    assert (s.scale, s.good_steps) == (512.0, 0)
    for _ in range(3):
        s.update(overflow=False)
    assert (s.scale, s.good_steps) == (1024.0, 0)
    s.update(overflow=False)
    other = LossScaler(True)
    other.load_state_dict(s.state_dict())
    assert (other.scale, other.good_steps) == (1024.0, 1)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 2048.0)
    s.unscale_([p])
    assert p.grad.tolist() == [2.0, 2.0]
    off = LossScaler(False)
    assert float(off.scale_loss(torch.tensor(2.0))) == 2.0 and off.state_dict()["scale"] == 1.0


def test_all_finite_sees_one_nan_or_inf_anywhere():
    ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]
    assert all_finite(ps)
    with torch.no_grad():
        ps[1][1] = float("inf")
    assert not all_finite(ps)


def test_bf16_compute_over_fp32_master_weights_tracks_the_fp32_step():
    fp32, bf16 = _learner(precision="fp32"), _learner(precision="bf16")
    assert bf16.compute_dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.float32
    before = _weights(fp32)
    a, b = fp32.train(_pairs(), round=1), bf16.train(_pairs(), round=1)
    assert a["steps"] == b["steps"] == 2 and b["loss_scale"] is None
    assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
    wa, wb = _weights(fp32), _weights(bf16)
    for k in wa:  # the update of each tensor agrees to bf16 tolerance (Adam amplifies tiny gradients)
        moved = (wa[k] - before[k]).norm()
        if moved > 0:
            assert float((wb[k] - wa[k]).norm() / moved) < 0.25, k


def test_fp16_compute_scales_the_loss_skips_overflowed_steps_and_keeps_the_scale_in_checkpoints(tmp_path):
    learner = _learner(precision="fp16")
    assert learner.scaler.enabled and next(learner.model.parameters()).dtype == torch.float32
    learner.scaler.scale = 2.0**20  # past fp16's range for these gradients: the first steps overflow
    report = learner.train(_pairs(32), round=1)
    assert report["overflow_steps"] >= 1 and report["skipped_steps"] == 0
    assert report["steps"] == 8 - report["overflow_steps"] and report["steps"] >= 1
    assert report["loss_scale"] == 2.0 ** (20 - report["overflow_steps"])
    assert all_finite(learner.model.parameters())
    learner.save(str(tmp_path / "ckpt"))
    again = _learner(precision="fp16")
    again.load(str(tmp_path / "ckpt"))
    assert again.scaler.state_dict() == learner.scaler.state_dict()
    assert again.overflow_steps == learner.overflow_steps


def test_a_step_that_makes_a_weight_nan_raises_naming_the_round():
    learner = _learner()
    learner.inject_nan_weights()
    with pytest.raises(NonFiniteWeights, match="round 3: optimizer step 1 made the policy's weights non-finite"):
        learner.train(_pairs(), round=3)


def test_fp16_master_weights_are_refused_naming_the_fix():
    with pytest.raises(ConfigError, match=r"model.dtype: float16 would hold the learner's master weights .* "
                                          r"set model.dtype: float32 with learner.precision: fp16"):
        load_config(DEMO, ["model.dtype=float16"])
    assert load_config(DEMO, ["learner.precision=fp16", "generator.dtype=float16"]).learner.precision == "fp16"


def test_reference_on_cpu_is_refused_where_it_would_run_on_the_cpu():
    gpu = ["learner.num_gpus_per_worker=1", "learner.ref_on_cpu=true"]
    with pytest.raises(ConfigError, match="learner.ref_on_cpu: needs learner.strategy: fsdp with num_workers >= 2"):
        load_config(DEMO, [*gpu, "learner.strategy=ddp", "learner.num_workers=2"])
    with pytest.raises(ConfigError, match="learner.ref_on_cpu"):
        load_config(DEMO, [*gpu, "learner.num_workers=1"])
    assert load_config(DEMO, [*gpu, "learner.strategy=fsdp", "learner.num_workers=2"]).learner.ref_on_cpu


def test_defaults_are_the_recommended_gpu_ones():
    c = load_config(None)
    assert (c.learner.strategy, c.learner.precision, c.model.dtype) == ("fsdp", "auto", "float32")

"""The learner's large-model mechanisms on 2 gloo ranks: meta init + streamed load, FSDP2 steps,
sharded checkpoints, tied embeddings; and LoRA adapters on the same model under FSDP2, DDP and one
process (gradients equal, the adapter checkpoint resharded onto one rank).

The model is the rehearsal model cut to 2 layers and an 8,192-entry vocabulary (Qwen2.5-0.5B's
layer shape, tied embeddings; 37M parameters). Each scenario runs ``Learner`` in two spawned
processes joined by gloo (what a ``LearnerWorker`` does, without Ray) and hands its results
back through files; the tests assert on them. The full-size rehearsal is ``bench/scale.py``.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch

from tests.conftest import same_state as _same
from tests.integration.conftest import SMALL_LAYERS

# Two spawned ranks build, step, save and load a 37M model: a CPU-minute or more, far longer on a loaded box.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]


def pairs(n: int = 8, offset: int = 0):
    """Pairs as the generators hand them over: exact prompt and completion token ids (varied
    lengths, so padding and masking matter), ids below the tokenizer's 4,099."""
    from common.types import PreferencePair

    out = []
    for i in range(offset, offset + n):
        g = torch.Generator().manual_seed(i)
        prompt, chosen, rejected = (torch.randint(0, 4099, (k,), generator=g).tolist()
                                    for k in (6 + i % 7, 3 + i % 5, 2 + i % 4))
        out.append(PreferencePair("", "", "", 1.0, 0.0, prompt_token_ids=prompt, chosen_token_ids=chosen,
                                  rejected_token_ids=rejected))
    return out


def _cfg(world: int, strategy: str, **kw):
    from orchestrator.config import LearnerConfig

    base = dict(num_workers=world, strategy=strategy, batch_size=8, micro_batch_size=2, lr=1e-3, beta=0.5,
                logprob_chunk=16, timeout_s=600)
    return LearnerConfig(**{**base, **kw})


def _snapshot(learner) -> dict:
    """Whole policy, reference and optimizer state on rank 0 (collectives on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from actors.learner.weights.stream import iter_full

    learner.reshard()
    policy = {k: v.clone() for k, v in learner.iter_full_state() if v is not None}
    reference = {k: v.clone() for k, v in iter_full(learner.reference) if v is not None}
    optim = {"state": {}}  # (asking DCP about an optimizer without state would create some)
    if learner.optimizer.state:
        optim = copy.deepcopy(get_optimizer_state_dict(
            learner.model, learner.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    return {"policy": policy, "reference": reference, "optimizer": optim, "steps": learner.steps,
            "scheduler": learner.scheduler.state_dict()}


def _tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _fsdp_then_ddp(rank: int, world: int, port: int, model_path: str, out: str, ckpt: str) -> None:
    """In two gloo ranks: the FSDP learner's scenario, then a DDP learner on the same steps."""
    import torch.distributed as dist

    from actors.learner.rank import Learner
    from orchestrator.config import ModelConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model_cfg = ModelConfig(path=model_path, max_model_len=64)
    fsdp: dict = {}
    learner = Learner(model_cfg, _cfg(world, "fsdp", activation_checkpointing=True))
    fsdp["tied"] = [_tied(learner.model), _tied(learner.reference)]
    fsdp["init"] = _snapshot(learner)
    fsdp["step1"] = learner.train(pairs(), round=1)
    fsdp["step2"] = learner.train(pairs(offset=3), round=2)
    fsdp["after"] = _snapshot(learner)
    learner.save(ckpt)
    fsdp["shard_files"] = sorted(p.name for p in (Path(ckpt) / "state").iterdir())
    fsdp["step3"] = learner.train(pairs(offset=5), round=3)
    learner.load(ckpt)
    fsdp["loaded"] = _snapshot(learner)
    fsdp["step3_again"] = learner.train(pairs(offset=5), round=3)
    fsdp["tied_end"] = [_tied(learner.model), _tied(learner.reference)]
    del learner
    ddp: dict = {}
    learner = Learner(model_cfg, _cfg(world, "ddp"))
    ddp["step1"] = learner.train(pairs(), round=1)
    ddp["step2"] = learner.train(pairs(offset=3), round=2)
    ddp["after"] = _snapshot(learner)
    del learner
    lora = {strategy: _lora_steps(Learner(model_cfg, _lora_cfg(world, strategy)),
                                  str(Path(ckpt).with_name("lora_ckpt")) if strategy == "fsdp" else None)
            for strategy in ("fsdp", "ddp")}
    if rank == 0:
        torch.save({"fsdp": fsdp, "ddp": ddp, "lora": lora}, out)
    dist.destroy_process_group()


def _lora_cfg(world: int, strategy: str):
    from orchestrator.config import LoraConfig

    return _cfg(world, strategy, lora=LoraConfig(r=8, alpha=16), ref_refresh_every=1, activation_checkpointing=True)


def _lora_steps(learner, ckpt: str | None = None) -> dict:
    """Two rounds of LoRA steps: each step's adapter gradients (whole, on rank 0), the reports, the
    adapter after them (PEFT naming); saved to ``ckpt`` when given."""
    grads: list[dict] = []
    step = learner.optimizer.step

    def step_and_keep_grads(*args, **kwargs):
        grads.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                      for n, p in learner.model.named_parameters() if p.requires_grad})
        return step(*args, **kwargs)

    learner.optimizer.step = step_and_keep_grads
    reports = [learner.train(pairs(), round=1), learner.train(pairs(offset=3), round=2)]
    adapter = {k: v.clone() for k, v in learner.adapters.iter_peft() if v is not None}
    if ckpt:
        learner.save(ckpt)
    return {"grads": grads, "reports": reports, "adapter": adapter,
            "trainable": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in learner.schedule.params)}


@pytest.fixture(scope="module")
def small_model(small_rehearsal_model) -> Path:
    return small_rehearsal_model  # conftest.py's, shared with test_rehearsal.py


@pytest.fixture(scope="module")
def runs(small_model, tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    from actors.learner.rank import Learner
    from orchestrator.config import ModelConfig

    tmp = tmp_path_factory.mktemp("scale")
    ckpt, out = tmp / "ckpt", tmp / "two_ranks.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_then_ddp, args=(2, port, str(small_model), str(out), str(ckpt)), nprocs=2)
    results = torch.load(out, weights_only=False)
    # The 2-rank FSDP checkpoint into one rank (this process, no process group): resharded on load.
    single = Learner(ModelConfig(path=str(small_model), max_model_len=64), _cfg(1, "ddp"))
    single.load(str(ckpt))
    results["resume_single"] = {"loaded": _snapshot(single), "step3_again": single.train(pairs(offset=5), round=3)}
    results["ckpt"] = ckpt
    del single
    results["lora"]["single"] = _lora_steps(Learner(ModelConfig(path=str(small_model), max_model_len=64),
                                                    _lora_cfg(1, "ddp")))
    loaded = Learner(ModelConfig(path=str(small_model), max_model_len=64), _lora_cfg(1, "ddp"))
    loaded.load(str(tmp / "lora_ckpt"))
    results["lora"]["loaded"] = {k: v.clone() for k, v in loaded.adapters.iter_peft()}
    return results


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)



def test_meta_init_and_streamed_load_equal_a_plain_load(runs, small_model):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32).state_dict()
    plain.pop("lm_head.weight")  # tied: one tensor, named once
    init = runs["fsdp"]["init"]
    assert _same(init["policy"], plain)
    assert _same(init["reference"], plain)  # the reference is a copy of the policy
    assert init["optimizer"]["state"] == {}


def test_tied_embeddings_stay_tied(runs):
    assert runs["fsdp"]["tied"] == [True, True]
    assert runs["fsdp"]["tied_end"] == [True, True]  # after steps, save and load
    assert "lm_head.weight" not in runs["fsdp"]["after"]["policy"]


def test_fsdp_steps_equal_ddp_steps(runs):
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    for step in ("step1", "step2"):
        assert fsdp[step]["steps"] == ddp[step]["steps"] == 1.0
        for key in ("loss", "logp_chosen", "logp_rejected", "reward_margin"):
            assert fsdp[step][key] == pytest.approx(ddp[step][key], abs=1e-5), (step, key)
    assert fsdp["step2"]["loss"] != pytest.approx(fsdp["step1"]["loss"], abs=1e-3)  # step 2 is not log 2
    # Adam divides by sqrt(v): rounding-level gradient differences show up at ~1e-6 of a 1e-3 step.
    assert _max_diff(fsdp["after"]["policy"], ddp["after"]["policy"]) < 1e-5
    assert _max_diff(fsdp["after"]["policy"], fsdp["init"]["policy"]) > 1e-4  # the steps moved weights
    for name, state in fsdp["after"]["optimizer"]["state"].items():
        want = ddp["after"]["optimizer"]["state"][name]
        assert float((state["exp_avg"] - want["exp_avg"]).abs().max()) < 1e-7, name


def test_sharded_checkpoint_round_trips_bit_exactly(runs):
    fsdp = runs["fsdp"]
    assert fsdp["shard_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank
    assert _same(fsdp["loaded"]["policy"], fsdp["after"]["policy"])
    assert _same(fsdp["loaded"]["reference"], fsdp["after"]["reference"])
    assert _same(fsdp["loaded"]["optimizer"], fsdp["after"]["optimizer"])
    assert fsdp["loaded"]["steps"] == fsdp["after"]["steps"] == 2
    assert fsdp["loaded"]["scheduler"] == fsdp["after"]["scheduler"]
    for key in ("loss", "grad_norm", "logp_chosen"):
        assert fsdp["step3_again"][key] == fsdp["step3"][key], key


def test_fsdp_checkpoint_resumes_on_one_rank(runs):
    single, fsdp = runs["resume_single"], runs["fsdp"]
    assert _same(single["loaded"]["policy"], fsdp["after"]["policy"])
    assert _same(single["loaded"]["reference"], fsdp["after"]["reference"])
    assert _same(single["loaded"]["optimizer"]["state"], fsdp["after"]["optimizer"]["state"])
    assert single["step3_again"]["loss"] == pytest.approx(fsdp["step3"]["loss"], abs=1e-5)


def test_hf_export_is_the_policy_and_the_checkpoint_checks_clean(runs, small_model):
    from transformers import AutoModelForCausalLM

    from orchestrator.rundir import checkpoint_problem

    ckpt = runs["ckpt"]
    exported = AutoModelForCausalLM.from_pretrained(ckpt / "policy", dtype=torch.float32)
    state = exported.state_dict()
    assert _tied(exported) and state.pop("lm_head.weight") is not None
    assert _same(state, runs["fsdp"]["after"]["policy"])
    assert checkpoint_problem(ckpt) is None


def test_lora_gradients_are_equal_under_fsdp2_ddp_and_one_process(runs):
    """LoRA on 2 gloo ranks (FSDP2 shards base and adapters alike; DDP reduces the adapters'
    gradients only) against one process: every step's adapter gradients equal to 1e-5 (fp32), the
    reports and the adapters after two rounds too; the FSDP adapter checkpoint loads on one rank."""
    lora = runs["lora"]
    single = lora["single"]
    assert single["trainable"] == lora["fsdp"]["trainable"] * 2  # FSDP: each rank holds half the adapter
    assert single["trainable"] == SMALL_LAYERS * 8 * (4 * (896 + 896) - 2 * 768 + 3 * (896 + 4864))  # q, o; k, v: 896 -> 128
    for strategy in ("fsdp", "ddp"):
        run = lora[strategy]
        assert len(run["grads"]) == len(single["grads"]) == 2
        for mine, want in zip(run["grads"], single["grads"]):
            assert mine.keys() == want.keys() and len(mine) == SMALL_LAYERS * 7 * 2
            assert max(float((mine[k] - want[k]).abs().max()) for k in mine) < 1e-5, strategy
            assert max(float(want[k].abs().max()) for k in want) > 1e-3  # gradients, not zeros
        for mine, want in zip(run["reports"], single["reports"]):
            assert mine["loss"] == pytest.approx(want["loss"], abs=1e-5) and mine["steps"] == want["steps"] == 1.0
        # After two AdamW steps (lr 1e-3): Adam's g / sqrt(v) turns rounding-level differences of
        # near-zero gradients into a few percent of a step.
        assert _max_diff(run["adapter"], single["adapter"]) < 1e-4
    assert _same(lora["loaded"], lora["fsdp"]["adapter"])

"""LoRA (``learner.lora``) in one process on the demo model: the adapters are PEFT's function and
files, the reference is the base (or the frozen copy after a refresh), checkpoints hold the
adapter and name their base, ``odpo export`` writes a PEFT folder or the merged model; the config
and the adapter sync's checks name what is wrong. (Sync into vLLM, the on-policy invariant with a
trained adapter and the exported folder served by vLLM: tests/integration/test_on_policy.py; FSDP2
and DDP: test_learner_scale.py; a SIGKILLed LoRA run resumed: test_async_resume.py.)"""

import json
import shutil

import pytest
import torch

from actors.generator.sampling import lora_engine_kwargs
from actors.learner.batching import collate
from actors.learner.loss import token_logps
from actors.learner.rank import Learner
from actors.weight_sync.adapter import check_adapter
from actors.weight_sync.layout import ParamSpec, WeightMismatchError
from common.types import PreferencePair
from orchestrator.cli.resume_check import check_run_dir
from orchestrator.config import ConfigError, LearnerConfig, LoraConfig, ModelConfig, check_plugins, dump_config, \
    load_config
from orchestrator.rundir import RunDir
from orchestrator.tools.export import export_run
from tests.conftest import DEMO_MODEL, REPO

LORA = {"r": 8, "alpha": 16}
DEMO = REPO / "configs" / "demo.yaml"


def _pairs(n: int = 16, offset: int = 0) -> list[PreferencePair]:
    out = []
    for i in range(offset, offset + n):
        g = torch.Generator().manual_seed(i)
        prompt, chosen, rejected = (torch.randint(3, 128, (k,), generator=g).tolist() for k in (5 + i % 4, 3 + i % 3, 2 + i % 3))
        out.append(PreferencePair("", "", "", 1.0, 0.0, prompt_token_ids=prompt, chosen_token_ids=chosen,
                                  rejected_token_ids=rejected))
    return out


def _learner(path=DEMO_MODEL, **kw) -> Learner:
    cfg = LearnerConfig(batch_size=16, micro_batch_size=8, lr=1e-2, lora=LoraConfig(**LORA), **kw)
    return Learner(ModelConfig(path=str(path), max_model_len=64), cfg, seed=0)


@pytest.fixture(scope="module")
def base() -> Learner:
    """A full fine-tuning learner on the demo model, untrained: the base."""
    return Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64), LearnerConfig(batch_size=16, micro_batch_size=8))


@pytest.fixture(scope="module")
def trained():
    """A LoRA learner after two rounds (its adapter no longer zero)."""
    learner = _learner()
    learner.train(_pairs(), round=1)
    learner.train(_pairs(offset=3), round=2)
    return learner


def _peft_logps(model, learner, pairs):
    kept, _ = learner._tokenize(pairs)
    batch = collate(kept, learner.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sums = token_logps(logits, batch["input_ids"], batch["completion_mask"]).sum(-1)
    return torch.stack([sums[: len(kept)], sums[len(kept):]], 1)


def test_only_the_adapters_train_and_a_fresh_adapter_is_the_base(base):
    learner = _learner(ref_refresh_every=1)
    trained = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert len(trained) == 2 * 2 * 7  # 2 layers x 7 linear layers x (A, B); the LM head has none
    assert learner.reference is None and learner.optimizer.param_groups[0]["params"] == learner.schedule.params
    assert torch.equal(learner.completion_logps(_pairs()), base.completion_logps(_pairs()))  # B starts at zero
    kept, _ = learner._tokenize(_pairs())
    learner.train(_pairs(), round=1)  # round 1 ends with a refresh: the reference copy := the adapter
    policy = learner.completion_logps(_pairs())
    assert torch.equal(learner._reference_logps(kept), policy) and not torch.equal(policy, base.completion_logps(_pairs()))
    assert learner.train(_pairs(offset=3), round=2)["kl"] == 0.0  # its one step starts where the reference is


def test_the_adapter_is_peft_s_function_and_files(trained, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained.save(str(tmp_path / "ckpt"))
    folder = tmp_path / "ckpt" / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32),
                                     str(folder)).eval()
    ours = trained.completion_logps(_pairs())
    assert float((ours - _peft_logps(peft, trained, _pairs())).abs().max()) < 1e-5
    merged = dict(trained.iter_full_state())  # the policy as whole weights: W + (alpha / r) B A
    want = peft.merge_and_unload().state_dict()
    assert max(float((merged[k] - want[k]).abs().max()) for k in merged) < 1e-6
    assert float((ours - base.completion_logps(_pairs())).abs().max()) > 0.1  # it learned something
    kept, _ = trained._tokenize(_pairs())
    assert torch.equal(trained._reference_logps(kept), base.completion_logps(_pairs()))  # the reference: adapter off


def test_a_checkpoint_holds_the_adapter_resumes_exactly_and_refuses_another_base(trained, base, tmp_path):
    ckpt = tmp_path / "ckpt"
    trained.save(str(ckpt))
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter", "rng_rank_0.json", "state", "trainer.json"]
    assert sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) < 0.2 * (DEMO_MODEL / "model.safetensors").stat().st_size * 4
    again = _learner()
    again.load(str(ckpt))
    a, b = trained.train(_pairs(offset=5), round=3), again.train(_pairs(offset=5), round=3)
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]

    other = tmp_path / "other-base"
    shutil.copytree(DEMO_MODEL, other)
    from safetensors.torch import load_file, save_file

    state = {k: v * 1.01 for k, v in load_file(str(other / "model.safetensors")).items()}  # same config
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    again.model_cfg = ModelConfig(path=str(other), max_model_len=64)  # as if started on that base
    with pytest.raises(ValueError, match=f"trained on the base model '{DEMO_MODEL}', and model.path '{other}' is a "
                                         "different model \\(its weights differs\\)"):
        again.load(str(ckpt))
    with pytest.raises(ValueError, match="holds a LoRA adapter, and learner.lora is not set"):
        base.load(str(ckpt))

    rd = RunDir(tmp_path / "run")  # the same refusal before Ray starts, at `odpo run --resume`
    rd.create()
    config = load_config(DEMO, ["run.name=run", "learner.lora={r: 8, alpha: 16}"])
    rd.write_config(dump_config(config))
    shutil.copytree(ckpt, rd.checkpoint_path(3))
    moved = load_config(DEMO, ["run.name=run", "learner.lora={r: 8, alpha: 16}", f"model.path={other}"])
    with pytest.raises(ConfigError, match="resume: round_000003: the adapter was trained on the base model"):
        check_run_dir(rd, moved, resume=True, allow_change=True)


def test_export_writes_a_peft_adapter_or_with_merge_the_merged_model(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rd = RunDir(tmp_path / "run")
    rd.create()
    rd.write_config(dump_config(load_config(DEMO, ["run.name=run", "learner.lora={r: 8, alpha: 16}"])))
    rd.append_metrics({"round": 0, "eval_reward": 0.4})
    rd.append_metrics({"round": 2, "pairs": 16, "loss": 0.6})
    ckpt = rd.checkpoint_path(2)
    trained.save(str(ckpt))
    (ckpt / "loop_state.json").write_text(json.dumps({"round": 2, "policy_version": 2}))

    assert export_run(rd.root, tmp_path / "out")["form"] == "adapter"
    model = tmp_path / "out" / "model"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in model.iterdir()}
    card = (model / "README.md").read_text()
    assert "library_name: peft" in card and "**A LoRA adapter** (PEFT format: r 8, alpha 16.0)" in card
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32), str(model))
    assert float((_peft_logps(peft.eval(), trained, _pairs()) - trained.completion_logps(_pairs())).abs().max()) < 1e-5

    assert export_run(rd.root, tmp_path / "merged", merge=True)["form"] == "merged"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model", dtype=torch.float32).eval()
    assert "**A merged model**" in (tmp_path / "merged" / "model" / "README.md").read_text()
    assert float((_peft_logps(merged, trained, _pairs()) - trained.completion_logps(_pairs())).abs().max()) < 1e-4


def test_config_names_bad_lora_fields():
    with pytest.raises(ConfigError, match="learner.lora.rank: unknown key"):
        load_config(DEMO, ["learner.lora={rank: 8}"])
    with pytest.raises(ConfigError, match="sync.backend: disk moves full weights; with learner.lora"):
        load_config(DEMO, ["learner.lora={r: 8}", "sync.backend=disk"])
    with pytest.raises(ConfigError, match="learner.precision: FSDP over 2 workers keeps one dtype per layer unit"):
        load_config(DEMO, ["learner.lora={r: 8}", "model.dtype=bfloat16", "learner.num_workers=2"])
    config = load_config(DEMO, ["learner.lora={r: 8, target_modules: [q_proj, qkv_proj]}"])
    with pytest.raises(ConfigError) as err:
        check_plugins(config)
    assert err.value.problems == ["learner.lora.target_modules: ['qkv_proj'] not among the linear layers of "
                                  "LlamaForCausalLM: ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', "
                                  "'up_proj', 'v_proj'] (or all-linear)"]
    check_plugins(load_config(DEMO, ["learner.lora={r: 8, target_modules: [q_proj, v_proj]}"]))


def test_engines_get_the_smallest_vllm_rank_and_adapters_are_checked_against_the_base():
    assert lora_engine_kwargs(None) == {}
    assert lora_engine_kwargs(12) == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 1}
    spec = ParamSpec({"model.layers.0.self_attn.q_proj.weight": (128, 64)})
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    check_adapter([(name + "A.weight", (8, 64)), (name + "B.weight", (128, 8))], spec, max_rank=8)
    with pytest.raises(WeightMismatchError, match=r"q_proj.lora_B.weight' has shape \[64, 8\], the engine's "
                                                  r"model.layers.0.self_attn.q_proj \(128 x 64\) takes \[128, 8\]"):
        check_adapter([(name + "A.weight", (8, 64)), (name + "B.weight", (64, 8))], spec)
    with pytest.raises(WeightMismatchError, match="rank 16, above the engine's max_lora_rank 8"):
        check_adapter([(name + "A.weight", (16, 64)), (name + "B.weight", (128, 16))], spec, max_rank=8)
    with pytest.raises(WeightMismatchError, match="not a LoRA factor of a linear layer of the engine's model"):
        check_adapter([("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", (8, 64))], spec)
    with pytest.raises(WeightMismatchError, match=r"has \['A.weight'\] only"):
        check_adapter([(name + "A.weight", (8, 64))], spec)

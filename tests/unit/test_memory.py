"""The memory preflight (orchestrator/cli/memory.py, orchestrator/cli/preflight.py check_memory): the
parameter count against transformers' own models, every term of the estimate against numbers
worked out by hand, the fit decision and the fixes it names, and `odpo validate` / `odpo run` on a
Qwen2.5-7B-shaped config.json that cannot fit an 80 GB GPU. How close the estimate is to a real
learner's peak is measured by bench/scale.py (estimate_vs_peak_1w, estimate_vs_peak_fsdp2)."""

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from orchestrator.cli.memory import CPU_RUNTIME, GPU_RUNTIME, LearnerSetup, ModelShape, UnknownShape, describe, \
    generator_memory, learner_memory, read_model_config
from orchestrator.cli.preflight import check_memory, learner_fixes
from orchestrator.config import load_config
from tests.conftest import DEMO_MODEL, REPO

QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
             "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "tie_word_embeddings": False, "max_position_embeddings": 32768}
# A shape small enough to work every term out by hand (Qwen2: q, k, v carry biases).
SMALL = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
# embedding 1000 x 64 = 64,000; a layer: q 64x64 + k, v 64x32 each + o 64x64 = 12,288, biases 64 + 32 + 32,
# MLP 3 x 64 x 256 = 49,152, two norms 128: 61,696; P = 2 x 64,000 (untied) + 2 x 61,696 + 64 (final norm).
SMALL_P = 251_456


@pytest.fixture
def q7b(tmp_path):
    """A folder holding nothing but a Qwen2.5-7B-shaped config.json."""
    (tmp_path / "q7b").mkdir()
    (tmp_path / "q7b" / "config.json").write_text(json.dumps(QWEN25_7B))
    return tmp_path / "q7b"


def config_7b(q7b, *overrides):
    return load_config(REPO / "configs" / "demo.yaml", [f"model.path={q7b}", "model.dtype=float32",
                                                        "model.max_model_len=1024", "learner.strategy=ddp",
                                                        "learner.num_gpus_per_worker=1", "generator.engine={}",
                                                        *overrides])


def _hf_configs():
    from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    from orchestrator.tools.rehearsal import QWEN25_05B

    small = dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    return {
        "demo (Llama, tied)": AutoConfig.from_pretrained(DEMO_MODEL),
        "rehearsal (Qwen2.5-0.5B shape, tied)": Qwen2Config(**QWEN25_05B),
        "Qwen2.5-7B shape (untied)": Qwen2Config(**{k: v for k, v in QWEN25_7B.items() if k not in ("architectures", "model_type")}),
        "Llama, untied, attention and MLP biases": LlamaConfig(**small, tie_word_embeddings=False, attention_bias=True,
                                                               mlp_bias=True),
        "Qwen3 (head_dim 32 != 64/4, q/k norms)": Qwen3Config(**small, head_dim=32, tie_word_embeddings=False),
        "Mistral": MistralConfig(**small, tie_word_embeddings=False),
        "small Qwen2": Qwen2Config(**{k: v for k, v in SMALL.items() if k != "model_type"}),
    }


@pytest.mark.parametrize("name", list(_hf_configs()))
def test_parameter_count_equals_the_transformers_model(name, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    hf = _hf_configs()[name]
    hf.save_pretrained(tmp_path)  # read back as the preflight reads it: config.json alone
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    shape = ModelShape.from_config(read_model_config(str(tmp_path))[0])
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.exact


def test_parameter_count_by_hand():
    shape = ModelShape.from_config(SMALL)
    assert (shape.embedding, shape.layer, shape.params) == (64_000, 61_696, SMALL_P)
    assert ModelShape.from_config(QWEN25_7B).params == 7_615_616_512  # Qwen2.5-7B's published 7.61B


def setup(**kw) -> LearnerSetup:
    base = dict(workers=1, strategy="ddp", on_gpu=False, master_bytes=4, compute_bytes=4, ref_bytes=4,
                ref_offloaded=False, checkpointing=True, tokens=100, seq=10, logprob_chunk=10)
    return LearnerSetup(**{**base, **kw})


def test_cpu_fp32_one_worker_by_hand():
    e = learner_memory(ModelShape.from_config(SMALL), setup())
    P = SMALL_P
    assert e.held == {"weights": 4 * P, "gradients": 4 * P, "AdamW m, v": 8 * P, "reference": 4 * P}
    # Checkpointing keeps each layer's input, 2 layers x 100 tokens x 4 B x 64 = 51,200; the layer being
    # recomputed holds 100 x (34 x 64 + 16 x 256) = 627,200 plus its attention mask 10 B x 100 tokens x
    # 10-token rows = 10,000, and its backward 100 x (8 x 64 + 8 x 256) = 256,000. Beats the LM head's backward
    # (51,200 + chunk 10 x 1,000 x 4 + head gradient 4 x 64,000 = 347,200) and the step (two temporaries of
    # the largest tensor, the 64,000-entry embedding: 512,000).
    assert e.phase == "decoder layers' backward"
    assert e.transient == {"saved activations": 51_200, "layer recompute": 637_200, "layer backward temporaries": 256_000}
    assert e.runtime == CPU_RUNTIME and e.total == 20 * P + 944_400 + CPU_RUNTIME
    # Without checkpointing both layers keep everything: 2 x 637,200 saved + 256,000 of the top layer's backward.
    e = learner_memory(ModelShape.from_config(SMALL), setup(checkpointing=False))
    assert e.phase == "LM head's backward" and sum(e.transient.values()) == 1_274_400 + 40_000 + 256_000


def test_gpu_fsdp_four_workers_bf16_by_hand():
    s = setup(workers=4, strategy="fsdp", on_gpu=True, compute_bytes=2, ref_bytes=2, checkpointing=False)
    e = learner_memory(ModelShape.from_config(SMALL), s)
    P = SMALL_P
    assert e.held == {"weights": P, "gradients": P, "AdamW m, v": 2 * P, "reference": P / 2}
    # Layers gathered in bf16: 100 x (23 x 64 + 8 x 256) + mask 10,000 = 362,000 saved per layer, backward
    # 100 x (4 x 64 + 4 x 256) = 128,000; two gathered layers 2 x 2 B x 61,696; the running layer's bf16
    # gradient and fp32 reduce-scatter input (2 + 4) x 61,696.
    assert e.phase == "decoder layers' backward"
    assert e.transient == {"saved activations": 724_000, "layer backward temporaries": 128_000,
                           "gathered layers": 246_784, "layer gradient + reduce-scatter": 370_176}
    assert e.total == 4.5 * P + 1_468_960 + GPU_RUNTIME
    # ref_on_cpu under FSDP on GPUs: the reference's shards are in host RAM.
    assert learner_memory(ModelShape.from_config(SMALL), replace(s, ref_offloaded=True)).held["reference"] == 0


def test_gpu_ddp_two_workers_autocast_by_hand():
    s = setup(workers=2, on_gpu=True, compute_bytes=2, ref_bytes=2)
    e = learner_memory(ModelShape.from_config(SMALL), s)
    P = SMALL_P
    # DDP: nothing divided, and its gradient buckets sit beside .grad (gradient_as_bucket_view off).
    assert e.held == {"weights": 4 * P, "gradients": 4 * P, "DDP gradient buckets": 4 * P, "AdamW m, v": 8 * P,
                      "reference": 2 * P}
    # foreach AdamW on GPU: one temporary the size of all parameters, 4 B x P; it beats the end of the forward
    # (51,200 saved + bf16 weight copies 2 x P + chunk 10 x 1,000 x (4 + 2) = 614,112) and the layers' backward
    # (51,200 + 100 x (31 x 64 + 8 x 256) + 10,000 + 100 x (4 x 64 + 4 x 256) = 592,400).
    assert (e.phase, e.transient) == ("optimizer step", {"AdamW temporaries": 4 * P})
    forward = learner_memory(ModelShape.from_config(SMALL), replace(s, on_gpu=False))  # CPU AdamW: 512,000
    assert forward.phase == "end of the forward"
    assert forward.transient == {"saved activations": 51_200, "autocast weight copies": 2 * P, "log-prob chunk": 60_000}


def test_token_budget_and_padding_from_the_config(q7b):
    s = LearnerSetup.from_config(config_7b(q7b, "learner.micro_batch_size=4"))
    assert (s.tokens, s.seq, s.compute_bytes, s.ref_bytes) == (8192, 1024, 2, 2)  # 2 x 4 pairs x 1,024
    assert LearnerSetup.from_config(config_7b(q7b, "learner.max_tokens_per_micro_batch=4096")).tokens == 4096
    fp32 = LearnerSetup.from_config(config_7b(q7b, "learner.precision=fp32"))
    assert (fp32.compute_bytes, fp32.ref_bytes) == (4, 4)  # ref_dtype auto follows the compute dtype on GPU
    # A budget below one pair's two sequences: that pair still gets a forward of its own.
    assert LearnerSetup.from_config(config_7b(q7b, "learner.max_tokens_per_micro_batch=512")).tokens == 2048
    cpu = LearnerSetup.from_config(config_7b(q7b, "learner.num_gpus_per_worker=0"))
    assert (cpu.on_gpu, cpu.compute_bytes, cpu.ref_bytes) == (False, 4, 4)


def test_generator_by_hand(q7b):
    shape = ModelShape.from_config(QWEN25_7B)
    c = config_7b(q7b, "generator.num_gpus=1", "generator.dtype=bfloat16")
    g = generator_memory(shape, c, 80e9)
    # bf16 weights 2 x 7,615,616,512; vLLM takes 0.92 x 80 GB; KV: 2 x 28 layers x 4 heads x 128 x 2 B.
    assert (g.weights, g.kv_cache, g.kv_per_token) == (15_231_233_024, 0.92 * 80e9 - 15_231_233_024, 57_344)
    g = generator_memory(shape, config_7b(q7b, "generator.num_gpus=2", "generator.tensor_parallel_size=2",
                                          "generator.dtype=bfloat16", "generator.engine={kv_cache_memory_bytes: 1073741824}"), 80e9)
    assert (g.weights, g.kv_cache, g.kv_per_token) == (7_615_616_512, 2**30, 28_672)
    assert shape.kv_bytes_per_token(2, tp=8) == 14_336  # 4 KV heads over 8 ranks: one head each, replicated
    assert generator_memory(shape, config_7b(q7b, "generator.num_gpus=1"), None).kv_cache is None
    assert generator_memory(shape, config_7b(q7b), None).kv_cache == 64 << 20  # a CPU engine: odpo's default


def test_fit_and_the_fixes_it_names(q7b):
    c = config_7b(q7b, "learner.micro_batch_size=4")
    shape, s = ModelShape.from_config(QWEN25_7B), LearnerSetup.from_config(c)
    need = learner_memory(shape, s).total
    lines, warnings, problems = check_memory(c, need / 0.85, "learner.gpu_memory_gb")
    assert problems == [] and warnings == [] and lines[0].endswith("fits")
    assert check_memory(c, None, "") == (["memory: the learner GPU's memory is unknown here (set "
                                          "learner.gpu_memory_gb; odpo run asks the cluster's GPUs): fit not checked"],
                                         [], [])
    _, warnings, problems = check_memory(c, need / 0.95, "learner.gpu_memory_gb")
    assert problems == [] and "little room" in warnings[0]
    _, _, problems = check_memory(c, 80e9, "learner.gpu_memory_gb")
    assert len(problems) == 1 and problems[0].startswith(f"learner: needs ≈ {need / 1e9:.1f} GB per GPU and a GPU "
                                                         "has 80.0 GB (learner.gpu_memory_gb); to fit in 90% of it, set ")
    # The FSDP worker count named is the smallest that fits in 90% of the GPU (72 GB); with
    # checkpointing fewer are enough.
    n, k = map(int, re.findall(r"learner.num_workers >= (\d+)", problems[0]))
    assert "learner.strategy: fsdp with learner.num_workers" in problems[0]
    fsdp = lambda w, **kw: learner_memory(shape, replace(s, strategy="fsdp", workers=w, **kw)).total  # noqa: E731
    assert fsdp(n) <= 72e9 < fsdp(n - 1)
    assert f"learner.activation_checkpointing: true and learner.strategy: fsdp with learner.num_workers >= {k}" in problems[0]
    assert k < n and fsdp(k, checkpointing=True) <= 72e9 < fsdp(k - 1, checkpointing=True)


def test_a_generator_whose_weights_fill_its_share_warns(q7b):
    # fp32 weights of 30.5 GB on one 30 GB GPU, of which vLLM may take 0.92 x 30 = 27.6 GB.
    c = config_7b(q7b, "generator.num_gpus=1", "learner.micro_batch_size=4")
    _, warnings, _ = check_memory(c, 30e9, "learner.gpu_memory_gb")
    assert warnings == ["generator: its weights leave 0.0 GB of a 30.0 GB GPU for the KV cache, less than one "
                        "1024-token sequence: raise generator.tensor_parallel_size or "
                        "generator.engine.gpu_memory_utilization, or set generator.dtype: bfloat16"]
    assert check_memory(config_7b(q7b, "generator.num_gpus=1", "generator.dtype=bfloat16"), 30e9, "x")[1] == []


def test_fixes_offer_bf16_master_weights_and_a_token_budget():
    shape = ModelShape.from_config(QWEN25_7B)
    # Held state dominates: bf16 master weights (with their bf16 AdamW moments) fit where fp32 do not.
    s = setup(on_gpu=True, compute_bytes=2, ref_bytes=2, tokens=2048, seq=1024, logprob_chunk=256)
    bf16 = learner_memory(shape, replace(s, master_bytes=2)).total
    assert learner_memory(shape, s).total > bf16 + 1
    assert f"model.dtype: bfloat16 (≈ {bf16 / 1e9:.1f} GB; bf16 AdamW state rounds away small updates)" in \
        learner_fixes(shape, s, bf16 + 1)
    # Activations dominate: the largest power-of-two token budget that fits.
    s = setup(workers=8, strategy="fsdp", on_gpu=True, compute_bytes=2, ref_bytes=2, tokens=65_536, seq=1024,
              logprob_chunk=256)
    device = learner_memory(shape, replace(s, tokens=8192)).total + 1
    assert learner_memory(shape, replace(s, tokens=16384)).total > device
    assert any(f.startswith("learner.max_tokens_per_micro_batch: 8192 (") for f in learner_fixes(shape, s, device))
    assert learner_fixes(shape, s, 1e9) == []  # nothing fits 1 GB


def test_what_is_not_estimated_or_only_warned(tmp_path):
    with pytest.raises(UnknownShape, match="mixture of experts"):
        ModelShape.from_config({**QWEN25_7B, "model_type": "qwen2_moe", "num_experts": 60})
    # A hub id that is not in the local cache: no estimate, no error (odpo validate stays offline).
    c = load_config(REPO / "configs" / "demo.yaml", ["model.path=odpo-test/not-a-model", "learner.num_gpus_per_worker=1",
                                                     "learner.gpu_memory_gb=1"])
    assert describe(c)[0].startswith("memory: not estimated (no config.json for odpo-test/not-a-model")
    assert check_memory(c, 1e9, "learner.gpu_memory_gb") == ([], [], [])
    # A layout assumed Llama-like warns instead of stopping the run.
    (tmp_path / "config.json").write_text(json.dumps({**QWEN25_7B, "model_type": "somethingnew"}))
    c = load_config(REPO / "configs" / "demo.yaml", [f"model.path={tmp_path}", "learner.num_gpus_per_worker=1"])
    _, warnings, problems = check_memory(c, 80e9, "learner.gpu_memory_gb")
    assert problems == [] and "layout of this model_type is assumed" in warnings[0]


def test_odpo_validate_on_a_7b_config_exits_2_naming_the_fields(q7b, tmp_path):
    cfg = tmp_path / "q7b.yaml"
    cfg.write_text(f"model: {{path: {q7b}, dtype: float32}}\n"
                   "learner: {strategy: ddp, num_gpus_per_worker: 1, gpu_memory_gb: 80}\n")
    out = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(cfg)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "a GPU has 80.0 GB (learner.gpu_memory_gb)" in errors[0]
    assert "learner.activation_checkpointing: true" in errors[0] and "learner.strategy: fsdp with learner.num_workers >= " in errors[0]
    assert "# memory (from " in out.stdout and "7.62B parameters" in out.stdout
    # Arithmetic only: validate imports none of the heavy frameworks for it.
    code = (f"import sys; from orchestrator.cli.main import main; rc = main(['validate', {str(cfg)!r}]);"
            "heavy = [m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules];"
            "assert rc == 2 and not heavy, (rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_odpo_run_stops_before_writing_or_starting_anything(q7b, tmp_path):
    cfg = tmp_path / "q7b.yaml"
    cfg.write_text(f"run: {{output_dir: {tmp_path / 'runs'}}}\nmodel: {{path: {q7b}}}\n"
                   "learner: {strategy: ddp, num_gpus_per_worker: 1, gpu_memory_gb: 80}\n")
    out = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(cfg)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "error: learner: needs ≈ " in out.stderr and "Ray" not in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_adapter_count_equals_peft_and_only_the_adapter_trains(q7b, targets):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    small = {k: v for k, v in SMALL.items() if k != "model_type"}
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(Qwen2Config(**small)),
                               LoraConfig(r=8, target_modules=targets))
    shape = ModelShape.from_config(SMALL)
    names = ("all-linear",) if targets == "all-linear" else tuple(targets)
    assert shape.adapter_params(8, names) == sum(p.numel() for p in model.parameters() if p.requires_grad)

    # Qwen2.5-7B on one 80 GB GPU: full fine-tuning in fp32 does not fit; LoRA r16 does, and its
    # gradients, AdamW state and reference are the adapter's alone (the base is held once).
    lora = "{r: 16, target_modules: all-linear}"
    base = ("learner.activation_checkpointing=true", "learner.micro_batch_size=4")
    c = config_7b(q7b, *base, f"learner.lora={lora}")
    s, full = LearnerSetup.from_config(c), LearnerSetup.from_config(config_7b(q7b, *base))
    m = ModelShape.from_config(QWEN25_7B)
    A = m.adapter_params(16, ("all-linear",))
    e = learner_memory(m, s)
    assert e.held == {"weights": 4 * (m.params + A), "gradients": 4 * A, "AdamW m, v": 8 * A, "reference": 4 * A}
    assert check_memory(config_7b(q7b, *base), 80e9, "x")[2]
    assert check_memory(c, 80e9, "x")[2] == [] and e.total < learner_memory(m, full).total / 2


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
@pytest.mark.parametrize("flags", [{"avx2"}, {"avx2", "avx512_bf16"}])
def test_every_shipped_config_is_estimated_on_cpus_with_and_without_bf16(config, flags, q7b, monkeypatch):
    # bfloat16_if_native (generator.dtype, learner.ref_dtype) counts 2 bytes where this CPU has bf16
    # instructions, else 4: the estimate of every shipped config, on a model folder of a known shape.
    import actors.hardware

    monkeypatch.setattr(actors.hardware, "cpu_info", lambda path="/proc/cpuinfo": ("test cpu", flags))
    c = load_config(REPO / "configs" / config, [f"model.path={q7b}", "learner.gpu_memory_gb=80"])
    lines = describe(c, 80e9)
    assert lines[0].startswith(f"memory (from {q7b}") and len(lines) == 3
    native = "avx512_bf16" in flags
    if c.generator.num_gpus == 0 and (c.generator.dtype or c.model.dtype) == "bfloat16_if_native":
        from orchestrator.cli.memory import generator_memory

        weights = generator_memory(ModelShape.from_config(QWEN25_7B), c, None).weights
        assert weights == (2 if native else 4) * ModelShape.from_config(QWEN25_7B).params / c.generator.tensor_parallel_size

"""The rehearsal model builder: Qwen2.5-0.5B's shape, a local tokenizer with Qwen's specials."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.cli.main import main
from orchestrator.tools.rehearsal import QWEN25_05B, make_rehearsal_model, rehearsal_config


def test_full_shape_has_qwen25_05b_parameter_count():
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(rehearsal_config())
    n = sum(p.numel() for p in model.parameters())
    assert n == 494_032_768  # Qwen2.5-0.5B's count (tied embeddings counted once)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size) == (896, 24, 14, 2, 4864, 151_936)
    assert c.hidden_size // c.num_attention_heads == 64  # vLLM's CPU attention needs head_dim 64+
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_1_5b_shape_has_qwen25_15b_parameter_count():
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(rehearsal_config(shape="1.5b"))
    assert sum(p.numel() for p in model.parameters()) == 1_543_714_304  # Qwen2.5-1.5B's count
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.hidden_size // c.num_attention_heads) == (1536, 28, 12, 2, 8960, 128)


def test_small_variant_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "rh"
    assert main(["make-rehearsal-model", str(out), "--layers", "1", "--vocab-size", "4608",
                 "--tokenizer-vocab", "512", "--dtype", "float32", "--seed", "3"]) == 0
    summary = json.loads((out / "rehearsal_summary.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    specials = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert specials == [512, 513, 514] and len(tok) == 515 == summary["tokenizer_size"]
    assert tok.eos_token_id == 514 and tok.pad_token_id == 512
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 513 and ids.count(514) == 2 and tok.decode(ids) == text  # byte-level: round-trips
    assert tok.decode(tok("naïve — ünïcode ✓", add_special_tokens=False)["input_ids"]) == "naïve — ünïcode ✓"
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [514, 512] and gen.pad_token_id == 512
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == 4608
    assert model.config.hidden_size == QWEN25_05B["hidden_size"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert summary["params"] == sum(p.numel() for p in model.parameters())

    # Same seed, same weights and tokenizer.
    again = make_rehearsal_model(tmp_path / "again", layers=1, vocab_size=4608, tokenizer_vocab=512,
                                 dtype="float32", seed=3)
    assert again == summary
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert (out / "tokenizer.json").read_text() == (tmp_path / "again" / "tokenizer.json").read_text()


def test_vocab_too_small_is_a_clear_error(tmp_path, capsys):
    assert main(["make-rehearsal-model", str(tmp_path / "x"), "--layers", "1", "--vocab-size", "100"]) == 2
    assert "vocab_size 100 is smaller than the tokenizer's 4096" in capsys.readouterr().err
    with pytest.raises(ValueError, match="layers must be >= 1"):
        make_rehearsal_model(tmp_path / "y", layers=0, vocab_size=8192)

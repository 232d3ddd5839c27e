"""A locally made stand-in for Qwen2.5-0.5B: the real architecture and shape, random weights.

``odpo make-rehearsal-model DIR`` writes a Hugging Face folder that loads in transformers and in
vLLM like the real model: ``Qwen2ForCausalLM`` with hidden 896, 24 layers, 14 query heads and 2
KV heads (head_dim 64), intermediate 4864, a 151,936-entry vocabulary and tied embeddings (about
494M parameters), random weights drawn from a fixed seed. The tokenizer is a byte-level BPE
trained here on a fixed synthetic text (so any string tokenizes), with Qwen's special tokens
``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` after the learned vocabulary and a Qwen-style
chat template. Nothing is downloaded. It is the model of the scale tests and benchmarks: the
memory and time figures of a 0.5B learner, measured rather than assumed.

The same builder makes reduced variants for fast tests (``--layers 4 --vocab-size 8192``): the
per-layer shape stays, the depth and vocabulary shrink. ``--shape 1.5b`` makes a stand-in for
Qwen2.5-1.5B instead (hidden 1536, 28 layers, 12 query and 2 KV heads, intermediate 8960, tied
embeddings: about 1.54B parameters), the LoRA scale rehearsal's model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

QWEN25_05B = dict(
    hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    intermediate_size=4864, vocab_size=151_936, tie_word_embeddings=True,
    max_position_embeddings=32_768, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
)
"""Qwen2.5-0.5B's shape (its config.json), the defaults of ``make_rehearsal_model``."""
QWEN25_15B = dict(QWEN25_05B, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, intermediate_size=8960)
"""Qwen2.5-1.5B's shape (its config.json): ``make_rehearsal_model(shape="1.5b")``."""
SHAPES = {"0.5b": QWEN25_05B, "1.5b": QWEN25_15B}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB = 4096
"""Learned byte-level BPE entries (256 bytes + merges); the three special tokens follow them."""

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as Qwen2.5-Instruct renders a conversation (a default system turn when none is given)."""

_WORDS = (
    "the of and to in is that for it as with was on be by at this are from or an which have not "
    "they but all one had their there been if more when will would who so no out up into what "
    "about than them can only other new some could time these two may then first any like now "
    "my such make over our even most after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good "
    "very make world still own see men work long get here between both life being under never "
    "day same another know while last might us great old year off come since against go came "
    "right used take three answer question number total each cost price apples books sold left "
    "how many what is the sum of times minus plus divided equals step so therefore first then"
).split()


def _corpus(seed: int, lines: int = 6000) -> list[str]:
    """Fixed synthetic text: sentences of common English words, made-up words (syllables, so
    the BPE has word pieces to learn), numbers and arithmetic. The merges, hence the ids,
    depend only on ``seed``."""
    rng = random.Random(f"odpo-rehearsal-corpus/{seed}")
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ar", "en", "ou")]
    made_up = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS if rng.random() < 0.6 else made_up) for _ in range(rng.randint(6, 18))]
        if rng.random() < 0.5:
            a, b = rng.randint(0, 999), rng.randint(1, 99)
            words += [str(a), rng.choice("+-*/"), str(b), "=", str(a + b)]
        text = " ".join(words).capitalize() + rng.choice(".?!") + rng.choice(["", "\n", " "])
        out.append(text)
    return out


def build_tokenizer(*, vocab: int = TOKENIZER_VOCAB, seed: int = 0):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template (transformers' fast
    tokenizer wrapping a ``tokenizers`` object); EOS is ``<|im_end|>``, padding ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    backend.train_from_iterator(_corpus(seed), trainer=trainer)
    backend.add_special_tokens(list(SPECIAL_TOKENS))  # ids right after the learned vocabulary, as in Qwen
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"], model_max_length=32_768)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def rehearsal_config(*, layers: int | None = None, vocab_size: int = QWEN25_05B["vocab_size"], tokenizer=None,
                     shape: str = "0.5b"):
    """The ``Qwen2Config`` of a rehearsal model (Qwen2.5-0.5B's or 1.5B's shape, ``layers`` deep)."""
    from transformers import Qwen2Config

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    shape = dict(SHAPES[shape], vocab_size=vocab_size)
    shape["num_hidden_layers"] = layers or shape["num_hidden_layers"]
    rope_theta = shape.pop("rope_theta")
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                   eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                   pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return Qwen2Config(**shape, **ids, hidden_act="silu", attention_dropout=0.0, use_sliding_window=False,
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta})


def make_rehearsal_model(
    out_dir: str | Path, *, layers: int | None = None, vocab_size: int = QWEN25_05B["vocab_size"], seed: int = 0,
    dtype: str = "bfloat16", tokenizer_vocab: int = TOKENIZER_VOCAB, shape: str = "0.5b",
) -> dict:
    """Write the rehearsal model to ``out_dir``; returns a summary (params, files, ids).

    ``dtype`` is the stored weights' dtype (bfloat16, as Qwen ships; float32 doubles the files).
    The model's vocabulary must hold the tokenizer's (``tokenizer_vocab`` + 3 special tokens).
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    if tokenizer_vocab + len(SPECIAL_TOKENS) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer_vocab} + {len(SPECIAL_TOKENS)} special tokens")
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab=tokenizer_vocab, seed=seed)
    config = rehearsal_config(layers=layers, vocab_size=vocab_size, tokenizer=tok, shape=shape)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype)).eval()
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
        eos_token_id=[config.eos_token_id, config.bos_token_id],  # <|im_end|>, <|endoftext|>
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    summary = {"params": params, "shape": shape, "layers": config.num_hidden_layers, "vocab_size": vocab_size, "tokenizer_size": len(tok),
               "dtype": dtype, "seed": seed, "eos_token_ids": model.generation_config.eos_token_id,
               "pad_token_id": config.pad_token_id}
    (out / "rehearsal_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

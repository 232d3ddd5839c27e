"""Make the demo's tokenizer and tiny Llama, and SFT it on a demo task until it is imperfect.

The shipped checkpoints under ``assets/demo/model`` (2-digit addition, ``task.py``) and
``assets/demo-graded/model`` (3-digit addition scored digit by digit, ``graded_task.py``) are
reproduced by ``odpo make-demo-model [--task graded]``.
The model is a 0.54M-parameter Llama (hidden 128, 2 layers, 2 heads of dim 64: vLLM's CPU
attention rejects head_dim 16) over a character vocabulary of 128. It is trained just long
enough that greedy accuracy on the held-out set sits around 0.3 while samples at temperature 1
often contain the right answer, so that online DPO has something to find.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from judges.verifiable import place_credit
from orchestrator.tools.demo import graded_task, task

TASKS = {"addition": (task, 240), "graded": (graded_task, 300)}
"""Each demo task: its data module (``split_problems``, ``write_data``) and default SFT steps."""

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = 128
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: specials, then printable ASCII and newline; BOS is prepended."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    assert len(vocab) <= VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1024,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def encode_rows(tok, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of prompt+answer+EOS (all the same length here) and a mask over answer+EOS."""
    ids, mask = [], []
    for row in rows:
        p = tok(row["prompt"])["input_ids"]
        c = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + c)
        mask.append([0] * len(p) + [1] * len(c))
    width = max(map(len, ids))
    ids = [x + [tok.pad_token_id] * (width - len(x)) for x in ids]
    mask = [m + [0] * (width - len(m)) for m in mask]
    return torch.tensor(ids), torch.tensor(mask)


@torch.no_grad()
def greedy_accuracy(model, tok, rows: list[dict], max_new_tokens: int = 4) -> float:
    """Held-out greedy accuracy with transformers (every demo prompt has the same length)."""
    model.eval()
    ids = torch.tensor([tok(r["prompt"])["input_ids"] for r in rows])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return sum(t.strip() == r["answer"] for t, r in zip(texts, rows)) / len(rows)


@torch.no_grad()
def graded_start(model, tok, rows: list[dict], n: int = 8, seed: int = 0, max_new_tokens: int = 5) -> dict:
    """Where the graded task starts: the greedy answers' mean place credit, and for ``n`` samples at
    temperature 1 the mean credit, the best sample's mean credit and the share of prompts whose
    best sample is perfect (every graded prompt has the same length)."""
    model.eval()
    torch.manual_seed(seed)
    ids = torch.tensor([tok(r["prompt"])["input_ids"] for r in rows])
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kw)
    many = ids.repeat_interleave(n, 0)
    sampled = model.generate(many, attention_mask=torch.ones_like(many), do_sample=True, temperature=1.0, top_k=0, **kw)
    greedy_texts = tok.batch_decode(greedy[:, ids.shape[1]:], skip_special_tokens=True)
    texts = tok.batch_decode(sampled[:, ids.shape[1]:], skip_special_tokens=True)
    scores = [[place_credit(texts[i * n + j], r["answer"]) for j in range(n)] for i, r in enumerate(rows)]
    best = [max(s) for s in scores]
    return {
        "eval_greedy_credit": round(sum(place_credit(t, r["answer"]) for t, r in zip(greedy_texts, rows)) / len(rows), 4),
        "eval_sample_credit_t1": round(sum(map(sum, scores)) / (n * len(rows)), 4),
        f"eval_best_of_{n}_credit": round(sum(best) / len(rows), 4),
        f"eval_best_of_{n}_perfect_share": round(sum(b == 1.0 for b in best) / len(rows), 4),
    }


def sft(model, tok, rows: list[dict], *, steps: int, lr: float, batch_size: int, seed: int) -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        ids, mask = encode_rows(tok, rng.sample(rows, batch_size))
        logits = model(ids).logits[:, :-1]
        target, m = ids[:, 1:], mask[:, 1:].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        )
        loss = (nll * m.reshape(-1)).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"sft step {step}: loss {loss.item():.4f}", flush=True)


def make_demo_model(
    out_dir: Path, *, task: str = "addition", steps: int | None = None, lr: float = 1e-3, batch_size: int = 128,
    seed: int = 0,
) -> dict:
    """Write a demo task's data and SFT'd model under ``out_dir``; returns a summary dict."""
    torch.set_num_threads(2)
    out_dir = Path(out_dir)
    data, default_steps = TASKS[task]
    steps = default_steps if steps is None else steps
    data.write_data(out_dir / "data")
    train, held_out = data.split_problems()
    tok = build_tokenizer()
    model = build_model(seed)
    start = time.time()
    sft(model, tok, train, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    summary = {
        "params": sum(p.numel() for p in model.parameters()),
        "sft_steps": steps,
        "sft_s": round(time.time() - start, 1),
        "eval_greedy_accuracy": greedy_accuracy(model, tok, held_out, max_new_tokens=5 if task == "graded" else 4),
    }
    if task == "graded":
        summary.update(graded_start(model, tok, held_out))
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    (model_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

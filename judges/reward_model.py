"""A Hugging Face sequence-classification reward model as a judge.

``RewardModelJudge(model="path/or/hub-id")`` loads ``AutoModelForSequenceClassification`` and its
own tokenizer in ``setup`` (on ``device``: the GPU when the actor has one, else CPU) and scores
each (prompt, completion) by the model's logit (``num_labels == 1``; for more labels, ``label``
picks one). The text is the reward model's chat template applied to the prompt (chat messages,
or a string as one user message) and the completion as the assistant's reply, when the tokenizer
has a template and ``chat_template`` is on; otherwise the prompt text followed by the completion.
Sequences are batched ``batch_size`` at a time and truncated from the left to ``max_length``
tokens: the end of the reply, where the reward model reads its score, is what must survive.
"""

from __future__ import annotations

from typing import Any

from judges.base import Judge, JudgeItem, prompt_text

_DTYPES = ("float32", "bfloat16", "float16")


class RewardModelJudge(Judge):
    def __init__(
        self,
        model: str,
        batch_size: int = 16,
        device: str | None = None,
        max_length: int = 2048,
        dtype: str = "float32",
        chat_template: bool = True,
        label: int = 0,
    ):
        """``device``: ``cuda``, ``cuda:1``, ``cpu``, or None for the GPU when one is visible."""
        if batch_size < 1 or max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        self.model_path, self.batch_size, self.device, self.max_length = model, batch_size, device, max_length
        self.dtype, self.chat_template, self.label = dtype, chat_template, label
        self.model: Any = None

    @classmethod
    def check_kwargs(cls, kwargs: dict) -> None:
        cls(**kwargs)

    def setup(self) -> None:
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "right"
        model = AutoModelForSequenceClassification.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype))
        if self.tokenizer.pad_token_id is None:
            # Without a pad token, batches cannot be padded; EOS is the usual stand-in.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if not 0 <= self.label < model.config.num_labels:
            raise ValueError(f"label {self.label} out of range: the model has {model.config.num_labels} labels")
        self.model = model.to(self.device).eval()

    def close(self) -> None:
        self.model = None

    def text(self, item: JudgeItem, completion: str) -> str:
        """The sequence the reward model reads for one completion."""
        if self.chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = item.prompt if isinstance(item.prompt, list) else [{"role": "user", "content": item.prompt}]
            return self.tokenizer.apply_chat_template(
                list(messages) + [{"role": "assistant", "content": completion}], tokenize=False)
        return prompt_text(item.prompt) + completion

    def rewards(self, texts: list[str]) -> list[float]:
        """The reward of each text, ``batch_size`` at a time."""
        import torch

        if self.model is None:
            self.setup()
        bos = self.tokenizer.bos_token
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start: start + self.batch_size]
            # A chat template that writes BOS itself must not get a second one.
            add_special = not (bos and all(t.startswith(bos) for t in chunk))
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=add_special).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits
            out.extend(logits[:, self.label].float().cpu().tolist())
        return out

    def score(self, items: list[JudgeItem]) -> list[list[float | None]]:
        if self.model is None:
            self.setup()
        texts = [self.text(item, c.text) for item in items for c in item.completions]
        flat = self.rewards(texts)
        out, i = [], 0
        for item in items:
            out.append(flat[i: i + len(item.completions)])
            i += len(item.completions)
        return out

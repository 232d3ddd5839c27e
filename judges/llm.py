"""LLM-as-a-judge: a judge model grades each completion with a rubric prompt.

``LLMJudge(model=...)`` owns an in-process vLLM engine on the judge model (built in ``setup``, so
the config check stays cheap): each completion's prompt is rendered from the rubric
(``judges.rubric``; a custom ``template`` with ``{prompt}`` and ``{response}`` is allowed), put
through the judge model's chat template when it has one (``chat``), and sampled ``k`` times; the
score is the mean of the parseable ``Score: N`` replies, ``None`` when none parse. A rendered
prompt too long for the judge model scores ``None`` (counted as ``prompt_too_long``), and the
reply budget shrinks to what fits. ``guided=True`` constrains the reply to ``Score: N`` with
vLLM's structured outputs (always parseable, no written justification).

Self-rewarding mode (``self_rewarding=True``): the policy judges its own samples through the
policy's generators, so this judge owns no engine. It then runs in the driver (the judge pool
sees ``runs_in_driver``) and must be handed ``generate(prompts, n, temperature, max_tokens) ->
list[list[str]]`` with ``bind_generate`` before scoring; the rubric text goes to ``generate``
as is (the policy side applies its own chat template) and a prompt it cannot run (too long)
comes back as an empty list, which scores ``None``.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Callable

from judges.base import Judge, JudgeItem, prompt_text
from judges.rubric import DEFAULT_TEMPLATE, check_template, guided_regex, mean_score, render

GenerateFn = Callable[[list[str], int, float, int], list[list[str]]]

DEFAULT_KV_CACHE_BYTES = 64 << 20
"""KV cache of a CPU judge engine unless ``engine`` sizes it (explicit, so it does not depend on RSS)."""


class LLMJudge(Judge):
    def __init__(
        self,
        model: str | None = None,
        template: str | None = None,
        k: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 256,
        engine: dict[str, Any] | None = None,
        self_rewarding: bool = False,
        chat: bool = True,
        guided: bool = False,
        max_score: int = 5,
        seed: int = 0,
    ):
        """``model``: the judge model folder or hub id (not with ``self_rewarding``). ``k``: judge
        samples per completion, averaged. ``engine``: extra ``vllm.LLM`` arguments."""
        if self_rewarding == (model is not None):
            raise ValueError("give either model (a judge model) or self_rewarding=True (the policy judges itself)")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if k > 1 and temperature == 0:
            raise ValueError("k > 1 needs temperature > 0 (greedy replies would all be the same)")
        self.template = template if template is not None else DEFAULT_TEMPLATE
        check_template(self.template)
        self.regex = guided_regex(max_score) if guided else None
        if self_rewarding and guided:
            raise ValueError("guided output needs the judge's own engine; not with self_rewarding")
        self.model, self.k, self.temperature, self.max_tokens = model, k, temperature, max_tokens
        self.engine = dict(engine or {})
        self.self_rewarding, self.chat, self.max_score, self.seed = self_rewarding, chat, max_score, seed
        self.llm = None
        self._generate: GenerateFn | None = None
        self._failures: Counter = Counter()

    @classmethod
    def check_kwargs(cls, kwargs: dict) -> None:
        cls(**kwargs)  # cheap: the engine is built in setup()

    @staticmethod
    def runs_in_driver(kwargs: dict) -> bool:
        return bool(kwargs.get("self_rewarding", False))

    def bind_generate(self, fn: GenerateFn) -> None:
        """Self-rewarding: how to sample from the policy (called by the judge pool before setup)."""
        self._generate = fn

    def setup(self) -> None:
        if self.self_rewarding or self.llm is not None:
            return
        # In-process engine: the multi-process one was ~50x slower inside a Ray actor on CPU.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        import torch

        args: dict[str, Any] = {"model": self.model, "seed": self.seed, "distributed_executor_backend": "uni"}
        # On CPU, vLLM's memory share minus the process RSS can go negative: size the cache
        # explicitly. On a GPU, vLLM's own default (a share of the GPU) is the right one.
        sized = {"gpu_memory_utilization", "kv_cache_memory_bytes"} & set(self.engine)
        if not sized and not torch.cuda.is_available():
            args["kv_cache_memory_bytes"] = DEFAULT_KV_CACHE_BYTES
        args.update(self.engine)
        self.llm = LLM(**args)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def close(self) -> None:
        self.llm = None

    def render(self, item: JudgeItem, response: str) -> str:
        """The judge prompt for one completion (before any chat template)."""
        return render(self.template, prompt_text(item.prompt), response)

    def pop_failures(self) -> dict[str, int]:
        out, self._failures = {k: v for k, v in self._failures.items() if v}, Counter()
        return out

    def score(self, items: list[JudgeItem]) -> list[list[float | None]]:
        prompts = [self.render(item, c.text) for item in items for c in item.completions]
        if self.self_rewarding:
            replies = self._ask_policy(prompts)
        else:
            replies = self._ask_engine(prompts)
        flat = [mean_score(r, self.max_score) for r in replies]
        self._failures["unparseable"] += sum(1 for r, s in zip(replies, flat) if r and s is None)
        out, i = [], 0
        for item in items:
            out.append(flat[i: i + len(item.completions)])
            i += len(item.completions)
        return out

    def _ask_policy(self, prompts: list[str]) -> list[list[str]]:
        if self._generate is None:
            raise RuntimeError("LLMJudge(self_rewarding=True) needs bind_generate(fn) before score()")
        if not prompts:
            return []
        replies = self._generate(prompts, self.k, self.temperature, self.max_tokens)
        if len(replies) != len(prompts):
            raise ValueError(f"generate returned {len(replies)} reply lists for {len(prompts)} prompts")
        self._failures["prompt_too_long"] += sum(1 for r in replies if not r)
        return [list(r) for r in replies]

    def _encode(self, text: str) -> list[int]:
        if self.chat and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        bos = getattr(self.tokenizer, "bos_token", None)
        # A template that writes BOS itself must not get a second one from the tokenizer.
        add_special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _ask_engine(self, prompts: list[str]) -> list[list[str]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            self.setup()
        structured = None
        if self.regex:
            from vllm.sampling_params import StructuredOutputsParams

            structured = StructuredOutputsParams(regex=self.regex)
        replies: list[list[str]] = [[] for _ in prompts]
        requests, params, where = [], [], []
        for i, text in enumerate(prompts):
            ids = self._encode(text)
            room = self.max_model_len - len(ids)
            if room < 1:
                self._failures["prompt_too_long"] += 1
                continue
            requests.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(n=self.k, temperature=self.temperature,
                                         max_tokens=min(self.max_tokens, room), structured_outputs=structured))
            where.append(i)
        if requests:
            outs = self.llm.generate(requests, params, use_tqdm=False)
            for i, out in zip(where, outs):
                replies[i] = [o.text for o in out.outputs]
        return replies

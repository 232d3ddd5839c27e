"""``GeneratorActor``: one vLLM engine (in-process, see docs/weight-sync.md) that samples ``n``
completions per prompt, tagged with the policy version it serves. ``actors.generator.pool`` runs
several of them. Weights change only through ``actors.weight_sync``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from actors.generator.sampling import adapter_id, cpu_thread_binding, encode_prompt, engine_kwargs, prompt_seed, \
    row_prompt, to_completion
from actors.progress import EngineCounter
from common.types import SampleGroup

log = logging.getLogger(__name__)

# ONEDNN_PRIMITIVE_CACHE_CAPACITY=0: vLLM's CPU GEMM handlers cache their oneDNN primitives per
# layer already; oneDNN's global cache (1,024 entries, one per batch shape) kept more and grew a
# demo generator's RSS by ~430 MB (+16%) over 40 rounds (bench/soak.py). No effect on GPU.
ENV_VARS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
            "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}


class GeneratorActor:
    """One vLLM engine. Used as a Ray actor by ``GeneratorPool``; plain-constructible for tests."""

    def __init__(self, model_cfg, gen_cfg, index: int = 0, seed: int = 0, prompt_field: str = "prompt",
                 engine_extra: dict | None = None):
        for key, value in ENV_VARS.items():
            os.environ.setdefault(key, value)
        import torch
        from vllm import LLM

        from actors import weight_sync

        on_gpu = torch.cuda.is_available()
        if not on_gpu and gen_cfg.tensor_parallel_size > 1:  # vLLM's CPU workers each need their own cores
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                                  cpu_thread_binding(sorted(os.sched_getaffinity(0)), gen_cfg.tensor_parallel_size))
        self.model_cfg, self.gen_cfg, self.index, self.prompt_field = model_cfg, gen_cfg, index, prompt_field
        self.llm = LLM(**engine_kwargs(model_cfg, gen_cfg, seed, on_gpu=on_gpu, extra=engine_extra,
                                       gpu_bf16=on_gpu and torch.cuda.is_bf16_supported()))
        self.tokenizer = self.llm.get_tokenizer()
        self.spec = weight_sync.engine_param_spec(self.llm)
        self.version = 0
        self.loaded_desc: dict | None = None  # the publication this engine last loaded in full
        self.lora_request = None
        """With LoRA: the adapter of ``version`` (vLLM's ``LoRARequest``), named by every sampling
        request; None while the engine serves its own weights (version 0: the base, which a fresh
        adapter equals)."""

    def ready(self) -> dict[str, Any]:
        """Who and where this actor is; the pool compares ``pid`` to count restarts."""
        import ray

        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return {"index": self.index, "version": self.version, "pid": os.getpid(),
                "node_id": ctx.get_node_id() if ctx else None}

    def get_version(self) -> int:
        return self.version

    def param_spec(self):
        return self.spec

    def sample(self, rows: list[dict], seed: int, greedy: bool = False, start: int = 0,
               overrides: dict | None = None) -> list[SampleGroup]:
        """One ``SampleGroup`` per row, in order; ``start`` is the rows' position in the round
        (seeds derive from it, so a round's result does not depend on the split). ``overrides``
        replaces sampling fields of the generator config for this call (``n``, ``temperature``,
        ``max_new_tokens``...: a self-rewarding judge samples its verdicts through here)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        cfg = self.gen_cfg.model_copy(update=overrides) if overrides else self.gen_cfg
        version, max_len = self.version, self.model_cfg.max_model_len
        n = 1 if greedy else cfg.n
        groups, prompts, params, sampled = [], [], [], []
        for k, row in enumerate(rows):
            prompt = row_prompt(row, self.prompt_field, start + k)
            ids = encode_prompt(self.tokenizer, prompt, chat=self.model_cfg.chat_template, position=start + k)
            group = SampleGroup(prompt=prompt, row=row, completions=[], policy_version=version, prompt_token_ids=ids)
            groups.append(group)
            room = max_len - len(ids)
            if room < 1:
                group.skipped = "too_long"
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(
                n=n, temperature=0.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
                max_tokens=min(cfg.max_new_tokens, room), stop=list(cfg.stop) or None,
                seed=None if greedy else prompt_seed(seed, start + k, n), logprobs=0,
            ))
            sampled.append(group)
        if prompts:
            # Finished prompts are reported to the driver as they come (orchestrator/observe/progress.py).
            counter = EngineCounter.factory("sample", self.index, progress_tag(seed, greedy), len(prompts))
            try:
                outputs = self.llm.generate(prompts, params, use_tqdm=counter, lora_request=self.lora_request)
            except Exception as e:  # the engine is in an undefined state now: the pool replaces it
                raise EngineFailed(f"generator {self.index}: vLLM raised during sampling: "
                                   f"{type(e).__name__}: {e}") from e
            for group, out in zip(sampled, outputs):
                # What the engine itself reports it received: the learner trains these ids.
                group.prompt_token_ids = list(out.prompt_token_ids)
                group.completions = [to_completion(c) for c in out.outputs]
        elapsed = time.perf_counter() - t0
        for group in groups:
            group.sample_s = elapsed
        return groups

    def load_weights(self, desc: dict, version: int) -> float:
        """Load published weights (``weight_sync`` descriptor); returns the seconds the load took."""
        delay = getattr(self, "fault_delay_next_load_s", 0.0)
        if delay:  # fault injection (orchestrator/loop/faults.py): a load that hangs past its timeout
            self.fault_delay_next_load_s = 0.0
            time.sleep(delay)
        if getattr(self, "fault_raise_next_load", False):  # fault injection: a load that fails once
            self.fault_raise_next_load = False
            raise RuntimeError(f"generator {self.index}: weight load of version {version} failed (injected: faults.events)")
        from actors import weight_sync

        if desc.get("adapter") is not None:  # LoRA: the version is an adapter; the base stays
            from vllm.lora.request import LoRARequest

            seconds = weight_sync.load_adapter_into_engine(self.llm, desc, self.spec, adapter_id(version))
            # The adapter lives in the engine's memory only: the path just names it (vLLM requires one).
            self.lora_request = LoRARequest(f"odpo-policy-v{version}", adapter_id(version),
                                            f"odpo://in-memory/policy-v{version}")
            self.version, self.loaded_desc = version, desc
            return seconds
        try:
            seconds = weight_sync.load_into_engine(self.llm, desc, self.spec)
        except Exception:
            if desc.get("token") is not None:  # streamed: some weights may be replaced already
                log.warning("weight load of version %d stopped part-way; restoring version %d", version, self.version)
                weight_sync.restore_engine(self.llm, self.loaded_desc, self.spec)
            raise
        self.version, self.loaded_desc = version, desc
        return seconds

    def remove_sync_files(self, paths: list[str]) -> None:
        """Remove the pool's weight-sync files (shared-memory buffers on this node)."""
        from actors import weight_sync

        weight_sync.remove_files(paths)

    def weight_transfer(self, step: str, payload: Any = None, version: int | None = None) -> None:
        """One step of vLLM's weight-transfer protocol (the ``nccl`` backend)."""
        from actors import weight_sync

        weight_sync.engine_transfer_step(self.llm, step, payload)
        if step == "finish" and version is not None:
            self.version = version

    def apply(self, fn, *args, **kwargs) -> Any:
        """Run ``fn(self, *args, **kwargs)`` inside the actor (benchmarks and tests)."""
        return fn(self, *args, **kwargs)


def progress_tag(seed: int, greedy: bool) -> str:
    """Names one pool-wide ``sample`` call in progress reports: every actor's share carries it."""
    return f"{seed}:{int(greedy)}"


class EngineFailed(RuntimeError):
    """A generator's engine raised inside ``generate``: the pool restarts and re-syncs the actor
    before its share is sampled again (a vLLM engine that raised mid-step is not reused)."""

"""Before ``odpo run`` starts any actor: can the Ray cluster hold them all, and can the learner fit
its GPUs?

The same check as ``odpo validate --cluster`` (``resources.check_cluster``: the totals, and every
actor on a single node, for GPUs, CPUs and custom resources), made by the driver once connected.
A shortfall stops the run within seconds with one line per problem, each naming the config field
to change (``ResourceShortfall``, a ``ConfigError``: exit 2), instead of an actor waiting for
resources that do not exist until its start timeout.

``wait_s`` > 0 (``odpo run --wait-for-resources SECONDS``) gives an autoscaling cluster that long
to grow: the actors' resource shapes are requested from Ray's autoscaler (a hint that a cluster
without one ignores), what is still missing is logged every 30 s, and the request is withdrawn
when the wait ends either way.

Memory (``check_memory``, also run by ``odpo validate``): the estimate of ``orchestrator.cli.memory``
against the memory of one learner GPU, ``learner.gpu_memory_gb`` or else what the cluster's GPUs
report (``cluster_gpu_memory``). A learner that cannot fit is a ``MemoryShortfall`` (exit 2) whose
line names the fields to change and the values that would fit (``learner_fixes``).

``bf16_warnings``: on a CPU without bf16 instructions (none of ``avx512_bf16``, ``amx_bf16``), each
CPU part of the config set to bfloat16, which runs on slow fallbacks there, with the field to
change (``bfloat16_if_native`` keeps bf16 where it is native). ``odpo validate`` and ``odpo run``
print them; they describe the driver's machine (a cluster's nodes may differ).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Callable

from actors.hardware import BF16_FLAGS, IF_NATIVE, cpu_info, native_bf16_cpu
from orchestrator.cli.memory import GB, LearnerSetup, ModelShape, UnknownShape, generator_memory, learner_memory, \
    model_shape
from orchestrator.config import ConfigError
from orchestrator.cli.resources import (
    START_ORDER,
    check_cluster,
    connected_nodes,
    judge_runs_in_driver,
    resource_plan,
    totals_of,
)

log = logging.getLogger("odpo")

INTERVAL_S = 30.0
"""Seconds between two reports while waiting for resources."""
POLL_S = 2.0
"""Seconds between two reads of the cluster while waiting."""


TIGHT = 0.9
"""Share of a GPU past which a fitting learner is still warned about (the CUDA allocator fragments)."""


class ResourceShortfall(ConfigError):
    """The cluster cannot hold the run's actors; ``problems`` holds one line per shortfall."""


class MemoryShortfall(ConfigError):
    """The learner cannot fit one GPU; its line names the fields to change."""


def actor_bundles(plan: dict) -> list[dict[str, float]]:
    """One resource shape per actor the run starts (what the autoscaler is asked to make room for)."""
    a = plan["actors"]
    shapes = []
    for kind in START_ORDER:
        want = {res: amount for res, amount in a[kind]["resources"].items() if amount}
        shapes += [dict(want) for _ in range(a[kind]["count"]) if want]
    return shapes


def request_from_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Ask Ray's autoscaler to make room for ``bundles`` (an empty list withdraws the request)."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as e:  # only a hint: a failure must not stop the run or hide its real error
        log.debug("request_resources(%s) failed: %s", bundles, e)


def await_fit(config: Any, wait_s: float = 0.0, *, read_nodes: Callable[[], list[dict]] = connected_nodes,
              request: Callable[[list[dict]], None] = request_from_autoscaler,
              clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Return the run's resource plan once the connected cluster can hold it; raise
    ``ResourceShortfall`` if it still cannot after ``wait_s`` seconds (0 = check once)."""
    plan = resource_plan(config, judge_in_driver=judge_runs_in_driver(config))
    started = clock()
    deadline, next_report = started + wait_s, started
    requested = False
    try:
        while True:
            nodes = read_nodes()
            problems = check_cluster(plan, totals_of(nodes), nodes)
            now = clock()
            if not problems:
                if requested:
                    log.info("the cluster grew to fit the run after %.0f s", now - started)
                return plan
            if now >= deadline:
                if wait_s:
                    log.warning("the cluster did not grow to fit the run within %.0f s (--wait-for-resources)", wait_s)
                raise ResourceShortfall(problems)
            if not requested:
                request(actor_bundles(plan))
                requested = True
            if now >= next_report:
                log.warning("the cluster cannot hold the run's actors yet; waiting up to %.0f s more "
                            "(--wait-for-resources) for: %s", deadline - now, " | ".join(problems))
                next_report = now + INTERVAL_S
            sleep(max(0.0, min(POLL_S, deadline - now)))
    finally:
        if requested:
            request([])


def learner_gpu_memory(config: Any, *, ask_cluster: bool = False, timeout_s: float = 60.0) -> tuple[float | None, str]:
    """``(bytes, where from)`` of one learner GPU: ``learner.gpu_memory_gb``; else, with
    ``ask_cluster`` and GPU workers, what a GPU of the connected cluster reports; else ``(None, "")``."""
    if config.learner.gpu_memory_gb is not None:
        return config.learner.gpu_memory_gb * GB, "learner.gpu_memory_gb"
    if ask_cluster and config.learner.num_gpus_per_worker > 0:
        reported = cluster_gpu_memory(config.learner, timeout_s)
        if reported:
            return reported, "as a learner GPU of the cluster reports it"
    return None, ""


def cluster_gpu_memory(learner_cfg: Any, timeout_s: float) -> float | None:
    """Total memory of a GPU where a learner worker could run (a Ray task with the worker's GPU and
    custom resources reads ``torch.cuda``); None when no answer comes within ``timeout_s``."""
    import ray

    def total_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    # max_calls=1: the worker process exits after the call, so no CUDA context stays on the GPU that
    # the learner or an engine (which checks free memory at start) is about to take.
    task = ray.remote(num_gpus=min(1.0, learner_cfg.num_gpus_per_worker), num_cpus=0, max_calls=1,
                      resources=dict(learner_cfg.resources) or None)(total_memory)
    ref = task.remote()
    try:
        return float(ray.get(ref, timeout=timeout_s))
    except Exception as e:  # a timeout, or no CUDA where it ran: the check is skipped, the run goes on
        log.info("GPU memory not read from the cluster (%s): the memory check is skipped", type(e).__name__)
        ray.cancel(ref, force=True)
        return None


def check_memory(config: Any, device: float | None, source: str = "") -> tuple[list[str], list[str], list[str]]:
    """``(lines, warnings, problems)`` of the learner against ``device`` bytes per GPU (from
    ``source``): the verdict, what is tight, and a learner that cannot fit (one line naming the
    fields to change, for ``MemoryShortfall``); nothing when the device or the model's shape is
    unknown. ``orchestrator.memory.describe`` prints the estimate itself. The generators are assumed
    to have the same GPUs; a generator that cannot fit only warns (vLLM's own error says it plainly)."""
    lines, warnings, problems = [], [], []
    if config.learner.gpu_memory_gb is not None and config.learner.num_gpus_per_worker == 0:
        warnings.append("learner.gpu_memory_gb: ignored, the learner runs on CPU (learner.num_gpus_per_worker 0)")
    try:
        m, _ = model_shape(config)
    except UnknownShape:
        return lines, warnings, problems
    s = LearnerSetup.from_config(config)
    if device is None and s.on_gpu:
        lines.append("memory: the learner GPU's memory is unknown here (set learner.gpu_memory_gb; odpo run asks "
                     "the cluster's GPUs): fit not checked")
    if device is None or not s.on_gpu:
        return lines, warnings, problems
    need = learner_memory(m, s).total
    lines.append(f"memory: the learner needs ≈ {need / GB:.1f} GB of a {device / GB:.1f} GB GPU ({source}): "
                 f"{'fits' if need <= device else 'does not fit'}")
    if need > device:
        fixes = learner_fixes(m, s, TIGHT * device)  # fixes that leave the allocator its room
        todo = (f"; to fit in {TIGHT:.0%} of it, set " + "; or ".join(fixes)) if fixes else (
            "; nothing here makes it fit: use GPUs with more memory, a smaller model.max_model_len or a smaller model")
        line = f"learner: needs ≈ {need / GB:.1f} GB per GPU and a GPU has {device / GB:.1f} GB ({source}){todo}"
        if m.exact:
            problems.append(line)
        else:
            warnings.append(line + " (the layout of this model_type is assumed, so this is not an error)")
    elif need > TIGHT * device:
        warnings.append(f"learner: needs ≈ {need / GB:.1f} of {device / GB:.1f} GB per GPU ({source}): little room "
                        "for the allocator's fragmentation")
    gen = generator_memory(m, config, device)
    max_len = int(config.generator.engine.get("max_model_len", config.model.max_model_len))
    if config.generator.num_gpus and gen.kv_cache is not None and gen.kv_cache < gen.kv_per_token * max_len:
        warnings.append(f"generator: its weights leave {max(gen.kv_cache, 0) / GB:.1f} GB of a {device / GB:.1f} GB "
                        f"GPU for the KV cache, less than one {max_len}-token sequence: raise "
                        "generator.tensor_parallel_size or generator.engine.gpu_memory_utilization, or set "
                        "generator.dtype: bfloat16")
    return lines, warnings, problems


def learner_fixes(m: ModelShape, s: LearnerSetup, device: float, max_workers: int = 4096) -> list[str]:
    """Config changes that make ``learner_memory`` fit ``device`` bytes, each with its estimate:
    every single change that fits alone (FSDP with the fewest workers, bf16 master weights,
    activation checkpointing, the largest token budget), then combinations that need fewer FSDP
    workers (activation checkpointing; and a token budget); empty when nothing here fits."""
    fits = lambda x: learner_memory(m, x).total <= device  # noqa: E731
    gb = lambda x: f"≈ {learner_memory(m, x).total / GB:.1f} GB"  # noqa: E731

    def fsdp_workers(x: LearnerSetup) -> int | None:
        n = next((k for k in _doubling(max(2, x.workers), max_workers) if fits(replace(x, strategy="fsdp", workers=k))), None)
        if n is None:
            return None
        lo = max(2, x.workers, n // 2 + 1)  # the doubling overshot at most down to n/2 + 1
        return next(k for k in range(lo, n + 1) if fits(replace(x, strategy="fsdp", workers=k)))

    def smallest(x: LearnerSetup) -> LearnerSetup:
        return replace(x, tokens=2 * x.seq)

    def budget(x: LearnerSetup) -> int | None:
        """The largest token budget up to ``x.tokens`` that fits: ``x.tokens`` itself, else a power
        of two (a round figure, with room left), at least one pair's 2 x max_model_len."""
        if fits(x):
            return x.tokens
        t = 1 << (x.tokens.bit_length() - 1)
        while t > 2 * x.seq and not fits(replace(x, tokens=t)):
            t //= 2
        t = max(t, 2 * x.seq)
        return t if fits(replace(x, tokens=t)) else None

    def fsdp_text(x: LearnerSetup, n: int) -> str:
        head = "" if s.strategy == "fsdp" else "learner.strategy: fsdp with "
        return f"{head}learner.num_workers >= {n} ({gb(replace(x, strategy='fsdp', workers=n))} per device)"

    fixes = []
    n = fsdp_workers(s)
    if n is not None:
        fixes.append(fsdp_text(s, n))
    if s.master_bytes == 4 and fits(replace(s, master_bytes=2)):
        fixes.append(f"model.dtype: bfloat16 ({gb(replace(s, master_bytes=2))}; bf16 AdamW state rounds away small updates)")
    if not s.checkpointing and fits(replace(s, checkpointing=True)):
        fixes.append(f"learner.activation_checkpointing: true ({gb(replace(s, checkpointing=True))})")
    if s.tokens > 2 * s.seq and (t := budget(s)) is not None and t < s.tokens:
        fixes.append(f"learner.max_tokens_per_micro_batch: {t} ({gb(replace(s, tokens=t))})")
    # Checkpointing, then a token budget, cost compute rather than GPUs: each combination is offered
    # when it needs fewer FSDP workers than the options before it.
    best = n
    ckpt = s if s.checkpointing else replace(s, checkpointing=True)
    for lean in (ckpt, smallest(ckpt)):
        k = fsdp_workers(lean) if lean != s else None
        if k is None or (best is not None and k >= best):
            continue
        best = k
        sharded = replace(lean, strategy="fsdp", workers=k)
        t = budget(replace(sharded, tokens=s.tokens)) if lean.tokens < s.tokens else s.tokens
        final = replace(sharded, tokens=t)
        parts = [] if s.checkpointing else ["learner.activation_checkpointing: true"]
        if t < s.tokens:
            parts.append(f"learner.max_tokens_per_micro_batch: {t}")
        if s.strategy != "fsdp" or k > s.workers:
            parts.append(fsdp_text(final, k))
        elif parts:
            parts[-1] += f" ({gb(final)})"
        if parts and " and ".join(parts) not in fixes:
            fixes.append(" and ".join(parts))
    return fixes


def _doubling(start: int, stop: int):
    k = start
    while k <= stop:
        yield k
        k *= 2

def bf16_warnings(config: Any, cpu: tuple[str, set[str]] | None = None) -> list[str]:
    """On this CPU without bf16 instructions (``cpu``: model name and flags, default this
    machine's), one line per CPU part of ``config`` in bf16 (slow here: the field to change) or in
    ``bfloat16_if_native`` (float32 here: what that costs); none on a CPU that has them."""
    model, flags = cpu or cpu_info()
    if native_bf16_cpu(flags):
        return []
    c, parts = config, []
    if c.generator.num_gpus == 0:
        parts.append(("generator.dtype", c.generator.dtype or c.model.dtype, "the generators' weights and matmuls"))
    if c.learner.num_gpus_per_worker == 0:
        parts.append(("model.dtype", c.model.dtype, "the learner's weights"))
        if not c.learner.lora:
            parts.append(("learner.ref_dtype", c.learner.ref_dtype, "the reference's forward"))
        parts.append(("learner.precision", {"bf16": "bfloat16"}.get(c.learner.precision), "the learner's matmuls"))
    cpu_says = f"this CPU ({model}) has no bf16 instructions (none of {', '.join(BF16_FLAGS)} in /proc/cpuinfo)"
    out = []
    for field, value, what in parts:
        if value == "bfloat16":
            fix = f"set {field}: {IF_NATIVE} (bf16 only where native) or float32" if field.endswith("dtype") \
                else f"set {field}: fp32"
            out.append(f"{field}: bfloat16, and {cpu_says}: {what} would run on slow fallbacks; {fix}")
        elif value == IF_NATIVE:
            out.append(f"{field}: {IF_NATIVE} runs float32 here ({cpu_says}): {what} at full speed, in twice "
                       "bf16's memory")
    return out

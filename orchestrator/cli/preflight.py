"""Before ``odpo run`` starts any actor: can the Ray cluster it is connected to hold them all?

The same check as ``odpo validate --cluster`` (``resources.check_cluster``: the totals, and every
actor on a single node, for GPUs, CPUs and custom resources), made by the driver once connected.
A shortfall stops the run within seconds with one line per problem, each naming the config field
to change (``ResourceShortfall``, a ``ConfigError``: exit 2), instead of an actor waiting for
resources that do not exist until its start timeout.

``wait_s`` > 0 (``odpo run --wait-for-resources SECONDS``) gives an autoscaling cluster that long
to grow: the actors' resource shapes are requested from Ray's autoscaler (a hint that a cluster
without one ignores), what is still missing is logged every 30 s, and the request is withdrawn
when the wait ends either way.

``bf16_warnings``: on a CPU without bf16 instructions (none of ``avx512_bf16``, ``amx_bf16``), each
CPU part of the config set to bfloat16, which runs on slow fallbacks there, with the field to
change (``bfloat16_if_native`` keeps bf16 where it is native). ``odpo validate`` and ``odpo run``
print them; they describe the driver's machine (a cluster's nodes may differ).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from actors.hardware import BF16_FLAGS, IF_NATIVE, cpu_info, native_bf16_cpu
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


class ResourceShortfall(ConfigError):
    """The cluster cannot hold the run's actors; ``problems`` holds one line per shortfall."""


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

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
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

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

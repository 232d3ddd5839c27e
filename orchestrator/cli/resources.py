"""What a run asks Ray for, and whether a cluster can give it.

``resource_plan(config)`` turns the placement fields of a config (actor counts, GPUs, CPUs and
custom resources per actor) into per-kind and total demands; ``check_cluster(plan, ...)``
compares them with a cluster's resources and returns one line per shortfall, naming the config
field to change. Both are pure, so ``odpo validate`` prints the plan without importing Ray; only
``read_cluster`` (``odpo validate --cluster``) and ``connected_nodes`` (``odpo run``, through
``orchestrator.cli.preflight``) touch a running cluster.

Semantics of the numbers:

- generator: ``generator.num_actors`` vLLM engines, each an actor holding ``generator.num_gpus``
  GPUs. With ``tensor_parallel_size`` k > 1 the engine's k ranks run inside that actor's share,
  so ``num_gpus`` must be at least k (one GPU per rank) and the actor must fit on one node.
- judge: ``judge.num_actors`` actors of ``judge.num_gpus`` GPUs each (0 for a reward function).
- learner: ``learner.num_workers`` workers of ``learner.num_gpus_per_worker`` GPUs each (one
  torch.distributed rank per worker).
- The driver (``odpo run``, the job entrypoint) reserves no Ray resources.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any

from actors.placement import alive_nodes, fits
from judges.loader import import_object

# Ray's resource names.
GPU, CPU = "GPU", "CPU"
KINDS = ("generator", "judge", "learner")

START_ORDER = ("learner", "generator", "judge")
"""The order ``odpo run`` starts the actors in (``run.build_parts``: the learner's placement group
is awaited before any generator exists): on a cluster too small, the first kind in this order
that does not fit is the one that would wait forever, so its fields are the ones to change."""

FIELDS = {
    "generator": ("generator.num_actors", "generator.num_gpus", "generator.num_cpus", "generator.resources"),
    "judge": ("judge.num_actors", "judge.num_gpus", "judge.num_cpus", "judge.resources"),
    "learner": ("learner.num_workers", "learner.num_gpus_per_worker", "learner.num_cpus_per_worker",
                "learner.resources"),
}
"""Per kind: the config fields behind its count, GPUs, CPUs and custom resources per actor."""


def field_of(kind: str, resource: str) -> str:
    """The config field that sets one actor's amount of ``resource`` (``judge.num_cpus``)."""
    _, gpus, cpus, custom = FIELDS[kind]
    return {GPU: gpus, CPU: cpus}.get(resource, f"{custom}.{resource}")


def _num(x: float) -> str:
    """1.0 -> '1', 0.5 -> '0.5': resource counts as a person writes them."""
    return f"{x:g}"


def judge_runs_in_driver(config: Any) -> bool:
    """Whether the configured judge is hosted in the driver (a self-rewarding judge that samples
    through the policy's generators) rather than in judge actors. Imports the judge's module."""

    hook = getattr(import_object(config.judge.cls), "runs_in_driver", None)
    return bool(callable(hook) and hook(dict(config.judge.kwargs)))


def resource_plan(config: Any, judge_in_driver: bool = False) -> dict:
    """Per actor kind: count, GPUs and CPUs per actor, and their products; plus totals.

    Returns ``{"actors": {kind: {"count", "gpus", "cpus", "total_gpus", "total_cpus", "resources",
    "detail"}}, "total": {"GPU": g, "CPU": c, custom: x}, "warnings": [...]}``; ``resources`` is
    one actor's demand (``{"GPU": g, "CPU": c, **custom}``). ``config`` is a ``RunConfig`` (only
    attribute access is used). ``judge_in_driver`` (see ``judge_runs_in_driver``): the judge
    starts no actors, so it asks for nothing.
    """
    g, j, le = config.generator, config.judge, config.learner
    judge_row = (0, 0.0, 0.0, {}, f"{j.cls}, in the driver (uses the generators)") if judge_in_driver else (
        j.num_actors, j.num_gpus, j.num_cpus, j.resources, j.cls)
    rows = {
        "generator": (g.num_actors, g.num_gpus, g.num_cpus, g.resources, f"tensor_parallel_size {g.tensor_parallel_size}"),
        "judge": judge_row,
        "learner": (le.num_workers, le.num_gpus_per_worker, le.num_cpus_per_worker, le.resources,
                    f"strategy {le.strategy}"),
    }
    actors = {}
    total = {GPU: 0.0, CPU: 0.0}
    for kind, (count, gpus, cpus, custom, detail) in rows.items():
        demand = {GPU: float(gpus), CPU: float(cpus), **{k: float(v) for k, v in custom.items() if v}}
        actors[kind] = {"count": int(count), "gpus": float(gpus), "cpus": float(cpus),
                        "total_gpus": count * float(gpus), "total_cpus": count * float(cpus),
                        "resources": demand, "detail": detail}
        for res, amount in demand.items():
            total[res] = total.get(res, 0.0) + count * amount

    warnings = []
    if g.tensor_parallel_size > 1 and g.num_gpus < g.tensor_parallel_size:
        warnings.append(
            f"generator.num_gpus ({_num(g.num_gpus)}) < generator.tensor_parallel_size ({g.tensor_parallel_size}):"
            " each tensor-parallel rank needs its own GPU inside the generator actor")
    kinds_on_gpu = [k for k, a in actors.items() if a["gpus"] > 0]
    if kinds_on_gpu and le.num_gpus_per_worker == 0:
        warnings.append("learner.num_gpus_per_worker is 0 while other actors use GPUs: the learner trains on CPU")
    if le.num_gpus_per_worker > 0 and le.num_gpus_per_worker != int(le.num_gpus_per_worker):
        warnings.append(
            f"learner.num_gpus_per_worker ({_num(le.num_gpus_per_worker)}) is fractional: NCCL needs one whole GPU per rank")
    return {"actors": actors, "total": total, "warnings": warnings}


def _custom(resources: dict) -> str:
    extra = [f"{_num(v)} {k}" for k, v in resources.items() if k not in (GPU, CPU)]
    return f", {', '.join(extra)}" if extra else ""


def format_plan(plan: dict) -> list[str]:
    """The plan as YAML comment lines (``#`` first), so they can follow a YAML document."""
    a = plan["actors"]
    summary = ", ".join(f"{k} {a[k]['count']} x {_num(a[k]['gpus'])} GPU" for k in KINDS)
    lines = [f"# resources: {summary}; total {_num(plan['total'][GPU])} GPU, {_num(plan['total'][CPU])} CPU"
             f"{_custom(plan['total'])}"]
    for k in KINDS:
        r = a[k]
        lines.append(f"#   {k:<9} {r['count']} x ({_num(r['gpus'])} GPU, {_num(r['cpus'])} CPU{_custom(r['resources'])})"
                     f" = {_num(r['total_gpus'])} GPU, {_num(r['total_cpus'])} CPU; {r['detail']}")
    lines += [f"# warning: {w}" for w in plan["warnings"]]
    return lines


def _total_shortfall(plan: dict, res: str, have: float) -> str:
    """One line for a resource the cluster has too little of in total: what each kind asks (in
    start order), which kind would be left waiting, and the field and value that would fit."""
    a = plan["actors"]
    asking = [k for k in START_ORDER if a[k]["count"] and a[k]["resources"].get(res)]
    need = plan["total"][res]
    short = need - have
    parts = ", ".join(f"{k} {a[k]['count']} x {_num(a[k]['resources'][res])}" for k in asking)
    before, stuck = 0.0, asking[-1]
    for k in asking:
        mine = a[k]["count"] * a[k]["resources"][res]
        if before + mine > have + 1e-9:
            stuck = k
            break
        before += mine
    # Lowering the stuck kind's amount by the whole shortfall fits the total (the kinds before it
    # fit already); when it has less than that to give, the others must give too.
    room = a[stuck]["resources"][res] - short / a[stuck]["count"]
    fields = [field_of(k, res) for k in asking]
    if room > -1e-9:
        others = [f for f in fields if f != field_of(stuck, res)]
        fix = (f"lower {field_of(stuck, res)} to {_num(math.floor(max(room, 0.0) * 100 + 1e-6) / 100)}"
               f"{' (or ' + ', '.join(others) + ')' if others else ''}")
    else:
        fix = f"lower {', '.join(fields)} so that they ask for {_num(short)} {res} less"
    return (f"{res}: the config asks for {_num(need)} ({parts}) and the cluster has {_num(have)}: the {stuck} actors"
            f" would wait forever; {fix}, or add {_num(short)} {res} to the cluster")


def check_cluster(plan: dict, cluster_resources: dict, nodes: list[dict] | None = None) -> list[str]:
    """Shortfalls of a cluster for a plan, one line each (empty list = it fits); each line names
    the config field to change and the numbers.

    ``cluster_resources`` is ``ray.cluster_resources()`` (totals; a missing key means none).
    ``nodes``, when given, holds each alive node's resources (``ray.nodes()[i]["Resources"]``):
    then every actor must also fit on one node, since a Ray actor never spans nodes.
    These are necessary conditions, not a full packing: the totals and the largest single actor.
    GPUs, CPUs and every custom resource an actor asks for are checked alike.
    """
    problems = []
    a = plan["actors"]
    for res, need in plan["total"].items():
        have = float(cluster_resources.get(res, 0))
        if need > have + 1e-9:
            problems.append(_total_shortfall(plan, res, have))
    if nodes:
        for k in START_ORDER:
            want = {res: amount for res, amount in a[k]["resources"].items() if amount}
            if not a[k]["count"] or not want:
                continue
            if any(fits(want, n) for n in nodes):
                continue
            largest = {res: max(float(n.get(res, 0)) for n in nodes) for res in want}
            too_big = [res for res in want if want[res] > largest[res] + 1e-9]
            if too_big:
                fix = ", ".join(f"{field_of(k, res)} to {_num(largest[res])}" for res in too_big)
                fix = f"lower {fix}, or add a node with {', '.join(f'{_num(want[res])} {res}' for res in too_big)}"
            else:
                fix = f"no single node has all of it: lower {' or '.join(field_of(k, res) for res in want)}"
            problems.append(
                f"{k}: one actor needs {', '.join(f'{_num(v)} {res}' for res, v in want.items())} on a single node;"
                f" the largest node has {', '.join(f'{_num(v)} {res}' for res, v in largest.items())}: {fix}")
    return problems


def totals_of(nodes: list[dict]) -> dict[str, float]:
    """The cluster's total resources: the sum of its nodes'."""
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def connected_nodes() -> list[dict]:
    """Each alive node's resources, read by this (already connected) Ray driver."""
    return alive_nodes()


def read_cluster(address: str | None = None, timeout_s: int = 30) -> tuple[dict, list[dict]]:
    """Total and per-node resources of a running Ray cluster.

    ``address``: ``RAY_ADDRESS`` by default, else ``auto`` (the cluster started on this machine
    with ``ray start``). A dashboard URL (``http://head:8265``, what ``ray job submit`` uses) is
    read through Ray's state API; a GCS address (``host:6379``) or ``auto`` by connecting a driver.
    Raises ``ConnectionError`` naming the address when no cluster answers.
    """
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if address.startswith(("http://", "https://")):
        from ray.util.state import list_nodes

        try:
            alive = list_nodes(address=address, filters=[("state", "=", "ALIVE")], timeout=timeout_s)
        except Exception as e:  # the state API raises several kinds for an unreachable dashboard
            raise ConnectionError(f"cannot read the Ray cluster at {address}: {type(e).__name__}: {e}") from None
        nodes = [dict(n.resources_total) for n in alive]
    else:
        _check_listening(address, timeout_s)
        import ray

        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except Exception as e:  # ConnectionError, or ValueError for a malformed address
            raise ConnectionError(f"cannot connect to a Ray cluster at {address}: {type(e).__name__}: {e}") from None
        try:
            nodes = connected_nodes()
        finally:
            ray.shutdown()
    return totals_of(nodes), nodes


def _check_listening(address: str, timeout_s: float) -> None:
    """Fail fast on ``host:port`` with nothing listening: ``ray.init`` would wait minutes for it."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms: Ray resolves them (and fails fast when no cluster is found)
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout_s, 10)).close()
    except OSError as e:
        raise ConnectionError(f"cannot connect to a Ray cluster at {address}: {e}") from None

"""What a run asks Ray for, and whether a cluster can give it.

``resource_plan(config)`` turns the placement fields of a config (actor counts, GPUs and CPUs
per actor) into per-kind and total demands; ``check_cluster(plan, ...)`` compares them with a
cluster's resources and returns one line per shortfall. Both are pure, so ``odpo validate``
prints the plan without importing Ray; only ``read_cluster`` (``odpo validate --cluster``)
touches a running cluster.

Semantics of the numbers:

- generator: ``generator.num_actors`` vLLM engines, each an actor holding ``generator.num_gpus``
  GPUs. With ``tensor_parallel_size`` k > 1 the engine's k ranks run inside that actor's share,
  so ``num_gpus`` must be at least k (one GPU per rank) and the actor must fit on one node.
- judge: ``judge.num_actors`` actors of ``judge.num_gpus`` GPUs each (0 for a reward function).
- learner: ``learner.num_workers`` workers of ``learner.num_gpus_per_worker`` GPUs each (one
  torch.distributed rank per worker).
- Custom resources (``generator.resources``, ``judge.resources``, ``learner.resources``) are
  per actor too: ``{node_b: 1}`` places each actor of that kind on a node started with
  ``ray start --resources='{"node_b": 1}'``; the check wants some node that offers them together
  with the actor's CPUs and GPUs, and enough of them in the cluster for every actor.
- The driver (``odpo run``, the job entrypoint) reserves no Ray resources.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from actors.placement import actor_needs, format_needs, missing_on_every_node

# Ray's resource names.
GPU, CPU = "GPU", "CPU"
KINDS = ("generator", "judge", "learner")


def _num(x: float) -> str:
    """1.0 -> '1', 0.5 -> '0.5': resource counts as a person writes them."""
    return f"{x:g}"


def judge_runs_in_driver(config: Any) -> bool:
    """Whether the configured judge is hosted in the driver (a self-rewarding judge that samples
    through the policy's generators) rather than in judge actors. Imports the judge's module."""
    from judges.loader import import_object

    hook = getattr(import_object(config.judge.cls), "runs_in_driver", None)
    return bool(callable(hook) and hook(dict(config.judge.kwargs)))


def resource_plan(config: Any, judge_in_driver: bool = False) -> dict:
    """Per actor kind: count, GPUs and CPUs per actor, and their products; plus totals.

    Returns ``{"actors": {kind: {"count", "gpus", "cpus", "resources", "total_gpus", "total_cpus",
    "detail"}}, "total": {"GPU": g, "CPU": c, <custom>: n...}, "warnings": [...]}`` (``resources``:
    the custom resources of one actor). ``config`` is a ``RunConfig`` (only
    attribute access is used). ``judge_in_driver`` (see ``judge_runs_in_driver``): the judge
    starts no actors, so it asks for nothing.
    """
    g, j, le = config.generator, config.judge, config.learner
    judge_row = (0, 0.0, 0.0, {}, f"{j.cls}, in the driver (uses the generators)") if judge_in_driver else (
        j.num_actors, j.num_gpus, j.num_cpus, j.resources, j.cls)
    rows = {
        "generator": (g.num_actors, g.num_gpus, g.num_cpus, g.resources,
                      f"tensor_parallel_size {g.tensor_parallel_size}"),
        "judge": judge_row,
        "learner": (le.num_workers, le.num_gpus_per_worker, le.num_cpus_per_worker, le.resources,
                    f"strategy {le.strategy}"),
    }
    actors = {}
    for kind, (count, gpus, cpus, custom, detail) in rows.items():
        actors[kind] = {"count": int(count), "gpus": float(gpus), "cpus": float(cpus),
                        "resources": {k: float(v) for k, v in custom.items()},
                        "total_gpus": count * float(gpus), "total_cpus": count * float(cpus), "detail": detail}
    total = {GPU: sum(a["total_gpus"] for a in actors.values()), CPU: sum(a["total_cpus"] for a in actors.values())}
    for a in actors.values():
        for name, amount in a["resources"].items():
            total[name] = total.get(name, 0.0) + a["count"] * amount

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


def format_plan(plan: dict) -> list[str]:
    """The plan as YAML comment lines (``#`` first), so they can follow a YAML document."""
    a = plan["actors"]
    summary = ", ".join(f"{k} {a[k]['count']} x {_num(a[k]['gpus'])} GPU" for k in KINDS)
    total = ", ".join(f"{_num(n)} {name}" for name, n in plan["total"].items())
    lines = [f"# resources: {summary}; total {total}"]
    for k in KINDS:
        r = a[k]
        custom = "".join(f", {_num(n)} {name}" for name, n in r["resources"].items())
        custom_total = "".join(f", {_num(r['count'] * n)} {name}" for name, n in r["resources"].items())
        lines.append(f"#   {k:<9} {r['count']} x ({_num(r['gpus'])} GPU, {_num(r['cpus'])} CPU{custom})"
                     f" = {_num(r['total_gpus'])} GPU, {_num(r['total_cpus'])} CPU{custom_total}; {r['detail']}")
    lines += [f"# warning: {w}" for w in plan["warnings"]]
    return lines


def _per_actor(row: dict, res: str) -> float:
    return {GPU: row["gpus"], CPU: row["cpus"]}.get(res, row["resources"].get(res, 0.0))


def check_cluster(plan: dict, cluster_resources: dict, nodes: list[dict] | None = None) -> list[str]:
    """Shortfalls of a cluster for a plan, one line each (empty list = it fits).

    ``cluster_resources`` is ``ray.cluster_resources()`` (totals; a missing ``GPU`` key means
    none). ``nodes``, when given, holds each alive node's resources (``ray.nodes()[i]["Resources"]``):
    then every actor must also fit on one node, since a Ray actor never spans nodes.
    These are necessary conditions, not a full packing: the totals and the largest single actor.
    """
    problems = []
    a = plan["actors"]
    for res, need in plan["total"].items():
        have = float(cluster_resources.get(res, 0))
        if need > have + 1e-9:
            parts = ", ".join(f"{k} {a[k]['count']} x {_num(_per_actor(a[k], res))}" for k in KINDS
                              if _per_actor(a[k], res))
            problems.append(f"{res}: the config asks for {_num(need)} ({parts}), the cluster has {_num(have)}")
    if nodes:
        for k in KINDS:
            r = a[k]
            need = actor_needs(r["cpus"], r["gpus"], r["resources"])
            missing = missing_on_every_node(need, nodes) if r["count"] and need else None
            if missing is None:
                continue
            if r["resources"]:
                problems.append(f"{k}: one actor needs {format_needs(need)} on a single node; missing: {'; '.join(missing)}")
                continue
            best_gpu = max(float(n.get(GPU, 0)) for n in nodes)
            best_cpu = max(float(n.get(CPU, 0)) for n in nodes)
            problems.append(
                f"{k}: one actor needs {_num(r['gpus'])} GPU and {_num(r['cpus'])} CPU on a single node;"
                f" the largest node has {_num(best_gpu)} GPU, {_num(best_cpu)} CPU")
    return problems


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
            nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
        finally:
            ray.shutdown()
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals, nodes


def _check_listening(address: str, timeout_s: float) -> None:
    """Fail fast on ``host:port`` with nothing listening: ``ray.init`` would wait minutes for it."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms: Ray resolves them (and fails fast when no cluster is found)
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout_s, 10)).close()
    except OSError as e:
        raise ConnectionError(f"cannot connect to a Ray cluster at {address}: {e}") from None

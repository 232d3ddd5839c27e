"""Where an actor can run: the resources it asks Ray for, and which nodes could ever hold it.

``actor_needs`` is what one actor (generator, judge actor or learner worker) asks for: its CPUs,
GPUs and the custom resources of its config section (``generator.resources`` etc., e.g.
``{node_b: 1}`` to pin it to nodes started with ``ray start --resources='{"node_b": 1}'``).
``missing_on_every_node`` compares that with the nodes' total resources and names what no node
has; ``odpo validate --cluster`` and the actor pools use it, the pools through ``why_unplaced``
when an actor did not start in time (a node lost and nothing left that offers its resources).
Pure apart from ``alive_nodes``, which asks the running cluster.
"""

from __future__ import annotations

EPS = 1e-9


class PlacementError(RuntimeError):
    """No alive node can ever hold an actor: waiting longer or retrying the round cannot help
    (unless a node offering the named resources joins, e.g. from an autoscaler)."""


def actor_needs(num_cpus: float, num_gpus: float, resources: dict | None = None) -> dict[str, float]:
    """The resources of one actor, zeros left out, e.g. ``{"CPU": 1.0, "node_b": 1.0}``."""
    need = {"CPU": float(num_cpus), "GPU": float(num_gpus), **{k: float(v) for k, v in (resources or {}).items()}}
    return {k: v for k, v in need.items() if v > 0}


def fits(need: dict[str, float], node: dict) -> bool:
    """Whether a node with these total resources could hold the actor (when nothing else runs)."""
    return all(float(node.get(k, 0)) + EPS >= v for k, v in need.items())


def missing_on_every_node(need: dict[str, float], nodes: list[dict]) -> list[str] | None:
    """None when some node fits ``need``; else what is missing, one entry per resource, e.g.
    ``["1 node_b (no node has it)"]`` or ``["4 GPU (the largest node has 1)"]``. When every
    resource exists somewhere but no node has them all, the entry says so."""
    if any(fits(need, n) for n in nodes):
        return None
    missing = []
    for k, v in need.items():
        best = max((float(n.get(k, 0)) for n in nodes), default=0.0)
        if best + EPS < v:
            missing.append(f"{v:g} {k} ({'no node has it' if not best else f'the largest node has {best:g}'})")
    return missing or [f"{format_needs(need)} together (no single node has all of them)"]


def format_needs(need: dict[str, float]) -> str:
    """``{"CPU": 1, "node_b": 1}`` -> ``1 CPU, 1 node_b``."""
    return ", ".join(f"{v:g} {k}" for k, v in need.items()) or "nothing"


def alive_nodes() -> list[dict]:
    """Total resources of each alive node of the connected cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def why_unplaced(need: dict[str, float]) -> str | None:
    """Why no alive node of the connected cluster can hold an actor asking ``need`` (None: some can,
    so a slow start rather than a missing node is the cause). Never raises."""
    try:
        nodes = alive_nodes()
    except Exception:  # the question is asked while reporting another error; it must not replace it
        return None
    missing = missing_on_every_node(need, nodes)
    if missing is None:
        return None
    return (f"no alive node offers what it needs ({format_needs(need)}): missing {'; '.join(missing)}; "
            f"{len(nodes)} alive node(s)")

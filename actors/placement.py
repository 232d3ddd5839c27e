"""Whether any node could ever hold an actor, and what is missing when none can.

An actor asks Ray for CPUs, GPUs and the custom resources of its config section
(``generator.resources`` etc., e.g. ``{node_b: 1}`` to pin it to nodes started with
``ray start --resources='{"node_b": 1}'``; ``actors.waiting.demand_of`` builds the dict). When a
start or restart outlasts its timeout, the pools ask ``why_unplaced``: if no alive node offers
that demand (the node it was pinned to was lost and nothing that offers its resources is left),
the wait ends in a ``PlacementError`` naming what is missing, rather than a bare timeout.
Pure apart from ``alive_nodes``, which asks the connected cluster.
"""

from __future__ import annotations

EPS = 1e-9


class PlacementError(RuntimeError):
    """No alive node can hold an actor: retrying the round cannot help (until a node that offers
    the named resources joins, e.g. from an autoscaler, and the run is resumed)."""


def fits(demand: dict[str, float], node: dict) -> bool:
    """Whether a node with these total resources could hold the actor (when nothing else runs)."""
    return all(float(node.get(k, 0)) + EPS >= v for k, v in demand.items())


def missing_on_every_node(demand: dict[str, float], nodes: list[dict]) -> list[str] | None:
    """None when some node fits ``demand``; else what is missing, one entry per resource, e.g.
    ``["1 node_b (no node has it)"]`` or ``["4 GPU (the largest node has 1)"]``; when every
    resource exists somewhere but no node has them all, the one entry says so."""
    if any(fits(demand, n) for n in nodes):
        return None
    missing = []
    for k, v in demand.items():
        best = max((float(n.get(k, 0)) for n in nodes), default=0.0)
        if best + EPS < v:
            missing.append(f"{v:g} {k} ({'no node has it' if not best else f'the largest node has {best:g}'})")
    return missing or [f"{_amounts(demand)} together (no single node has all of them)"]


def _amounts(demand: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in demand.items()) or "nothing"


def alive_nodes() -> list[dict]:
    """Total resources of each alive node of the connected cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def why_unplaced(demand: dict[str, float]) -> str | None:
    """Why no alive node of the connected cluster can hold an actor asking ``demand`` (None: some
    node can, so the wait was for a slow start, not a missing node). Never raises."""
    try:
        nodes = alive_nodes()
    except Exception:  # asked while reporting another error, which it must not replace
        return None
    missing = missing_on_every_node(demand, nodes)
    if missing is None:
        return None
    return (f"no alive node offers what it needs ({_amounts(demand)}): missing {'; '.join(missing)}; "
            f"{len(nodes)} alive node(s)")

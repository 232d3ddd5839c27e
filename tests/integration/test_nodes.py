"""The loop across two real Ray nodes on this machine, and a node lost mid-run.

One cluster for the module: a head (`ray start --head`, 2 CPUs, custom resource `node_a`) and a
worker node (`ray start --address`, 1 CPU, `node_b`), each with its own ports and temp dir,
ended by their process groups. Runs pin the generator to the worker (`generator.resources`) and
the learner and judge to the head. Two nodes on one machine have different node ids, so the
weight sync takes the cross-node path (the object store), as between machines.

- A 3-round run: every round's weights cross nodes (`sync_path` object_store) and its figures
  equal the single-node run's of the same seed (`sync_run`, conftest.py).
- A 4-round run held (by its judge) while round 2 is being judged: a replacement node that offers
  `node_b` joins, the generator's node is lost (its raylet killed by pid), and the loop notices at
  round 2's weight sync; Ray restarts the generator on the replacement, the pool waits for it and
  loads the weights again, and rounds 2 and 3 finish once with the single-node figures. In round 4
  the replacement is lost too, with no node left that offers `node_b`: the run stops after
  `generator.start_timeout_s` with an error naming `node_b`, having checkpointed round 3.
"""

import json
import os
import signal
import subprocess
import sys
import warnings

import pytest

from tests.conftest import REPO
from tests.integration.ray_nodes import add_node, count_alive, node_env
from tests.integration.runs import end_group, metrics, start_run, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLACE = ["generator.resources={node_b: 1}", "learner.resources={node_a: 1}", "judge.resources={node_a: 1}"]
WORKER = {"num_cpus": 1, "resources": {"node_b": 1}, "object_store_mb": 256}


@pytest.fixture(scope="module")
def cluster():
    nodes: list = []
    try:
        head = add_node(nodes, num_cpus=2, resources={"node_a": 4}, object_store_mb=256, cwd=REPO)
        add_node(nodes, cwd=REPO, **WORKER)
        yield {"head": head, "nodes": nodes, "add_worker": lambda: add_node(nodes, cwd=REPO, **WORKER)}
    finally:
        for node in reversed(nodes):
            node.stop()


def with_worker_alive(cluster) -> None:
    """Make sure the module's cluster still has its worker node before a run is placed on it.

    A worker node can end before a test uses it. Once, on a CI host running three test files at
    once, it ended during the minute this module waited for `sync_run`. If the node is gone, it is
    ended by its process group and a new one is started in its place, so the test still checks the
    loop rather than this machine's load. Why the node ended is reported as a warning, with the
    tails of its logs.
    """
    nodes = cluster["nodes"]
    out = count_alive(nodes[0])
    if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(len(nodes))]:
        return
    for node in nodes[1:]:
        warnings.warn(f"a worker node of the test cluster was lost before the run; it is replaced\n{node.why_ended()}")
        node.stop()
        nodes.remove(node)
    cluster["add_worker"]()


def same_figures(run: list[dict], baseline: list[dict], rounds) -> None:
    base = {m["round"]: m for m in baseline}
    for m in run:
        if m["round"] in rounds:
            for key in ("loss", "reward_mean"):
                assert m[key] == pytest.approx(base[m["round"]][key], abs=1e-6), (m["round"], key)
            assert m["prompts_sha"] == base[m["round"]]["prompts_sha"]


def validate(cluster, *overrides):
    env = {**node_env(), "RAY_ADDRESS": cluster["head"].gcs}
    args = [sys.executable, "-m", "orchestrator", "validate", "configs/demo.yaml", "--cluster"]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_validate_cluster_checks_the_placement_per_node(cluster):
    out = validate(cluster, *PLACE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("# cluster: 0 GPU, 3 CPU, 1 node_b, 4 node_a on 2 node(s); fits")
    out = validate(cluster, *PLACE, "generator.resources={node_c: 1}")
    assert out.returncode == 2
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        "error: node_c: the config asks for 1 (generator 1 x 1) and the cluster has 0: the generator actors would"
        " wait forever; lower generator.resources.node_c to 0, or add 1 node_c to the cluster",
        "error: generator: one actor needs 1 CPU, 1 node_c on a single node; the largest node has 2 CPU, 0 node_c:"
        " lower generator.resources.node_c to 0, or add a node with 1 node_c",
    ]


@pytest.mark.timeout(1200)  # it may be the first to need `sync_run`, a run of its own
def test_two_node_run_matches_one_node_and_a_lost_node_is_replaced_then_with_none_left_it_stops(
        cluster, out_dir, sync_run, tmp_path):
    # One run on the two-node cluster, generator on the worker node: rounds 0-1 are a plain
    # two-node run; the generator's node is lost during round 2, a replacement joins; during
    # round 4 the replacement is lost too and no node offers node_b any more.
    # Judge calls: 1 = round 0 eval, 2 = round 1, 3 = round 2, 4 = round 2 eval, 5 = round 3, 6 = round 4.
    judge = ["judge.cls=tests.integration.judges_for_tests:GateJudge",
             f"judge.kwargs={{gate_dir: {tmp_path}, hold_calls: [3, 6], answer_field: answer, mode: number}}"]
    # The run stops only after waiting `start_timeout_s` for a node that offers node_b: short, but
    # long enough for an engine start on a loaded machine.
    with_worker_alive(cluster)
    proc = start_run(out_dir, "lost", "loop.rounds=4", "generator.start_timeout_s=90", *PLACE, *judge,
                     ray_address=cluster["head"].gcs)
    log, run_dir = out_dir / "lost.log", out_dir / "lost"
    try:
        wait_for(lambda: (tmp_path / "held-3").exists(), proc, 400, "round 2's judging", log)
        lost = cluster["nodes"][-1]
        cluster["add_worker"]()  # a replacement that offers node_b, as an autoscaler would start
        os.kill(lost.raylet_pid(), signal.SIGKILL)  # the generator's node is gone
        (tmp_path / "go-3").touch()
        wait_for(lambda: (tmp_path / "held-6").exists(), proc, 400, "round 4's judging", log)
        os.kill(cluster["nodes"][-1].raylet_pid(), signal.SIGKILL)  # and no node offers node_b now
        (tmp_path / "go-6").touch()
        rc = proc.wait(timeout=400)
    finally:
        end_group(proc)
    text = log.read_text()
    assert rc != 0, text[-3000:]
    errors = [line for line in text.splitlines() if "PlacementError: generator 0 " in line]
    assert errors, text[-3000:]
    assert "within generator.start_timeout_s=90s" in errors[-1] and "missing 1 node_b (no node has it)" in errors[-1]

    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == [0, 1, 2, 3]  # each round once; round 4 never completed
    assert [m["restarts"]["generator"] for m in lines[1:]] == [0, 1, 1]
    assert {(m["restarts"]["learner"], m["restarts"]["round_retries"]) for m in lines[1:]} == {(0, 0)}
    assert [m["sync_path"] for m in lines[1:]] == ["object_store"] * 3
    same_figures(lines, metrics(sync_run["dir"]), rounds={1, 2, 3})
    evals = {m["round"]: m["eval_reward"] for m in metrics(sync_run["dir"]) if "eval_reward" in m}
    assert {m["round"]: m["eval_reward"] for m in lines if "eval_reward" in m} == {0: evals[0], 2: evals[2]}
    state = json.loads((run_dir / "checkpoints" / "round_000003" / "loop_state.json").read_text())
    assert state["round"] == 3

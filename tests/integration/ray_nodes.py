"""Real Ray nodes for tests: `ray start --block` on loopback, each with its own ports and temp dir,
in its own process group (ended by that group's id, never by name).

`ray start --block` stays in the foreground as the parent of the node's raylet (and, on a head,
its GCS and dashboard); when one of them dies it ends the rest and exits, so killing a worker
node's raylet takes the whole node down, as a lost machine would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.integration.runs import free_port

VENV_BIN = Path(sys.executable).parent
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port")


def node_env(**extra: str) -> dict:
    """The nodes' environment: this venv's `python` first on PATH (a job's entrypoint runs it), and
    5 minutes rather than 30 s for each dashboard module to start (on a loaded machine a head's
    dashboard otherwise fails to start: "Module MetricsHead failed to start"), and no drain on
    SIGTERM: `ray start --block` otherwise asks the GCS to drain the node first, and as the whole
    process group gets the signal the GCS is already gone, so it waits out the 30 s default."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "300",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class RayNode:
    proc: subprocess.Popen
    ports: dict
    temp_dir: str

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    def raylet_pid(self) -> int:
        """The raylet started by this node's `ray start` (a child of that process)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                exe = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and exe.endswith(b"/raylet"):
                return int(entry.name)
        raise AssertionError(f"no raylet under `ray start` pid {self.proc.pid}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        path = Path(self.temp_dir) / "node.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def why_ended(self, chars: int = 1500) -> str:
        """The tails of the logs that say why a node ended: `ray start`'s own, Ray's record of
        its processes' exits, and the raylet's."""
        parts = [f"node.log (exit {self.proc.poll()}):\n{self.log_tail(chars)}"]
        for name in ("ray_process_exit.log", "raylet.out", "raylet.err"):
            for path in sorted(Path(self.temp_dir).glob(f"session_2*/logs/{name}")):  # not session_latest
                parts.append(f"{name}:\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """End the node's process group (SIGTERM, then SIGKILL) and remove its temp dir."""
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_node(*, head_address: str | None = None, num_cpus: float, num_gpus: float = 0,
               resources: dict | None = None, dashboard: bool = False, object_store_mb: int | None = None,
               cwd: Path | None = None, env: dict | None = None) -> RayNode:
    """A head (``head_address`` None) or a worker joining ``head_address`` (the GCS host:port);
    ``env``: extra environment (e.g. ``RAY_<setting>`` system settings for a head's GCS)."""
    ports = {name: free_port() for name in NODE_PORTS + (HEAD_PORTS if head_address is None else ())}
    lo = free_port()
    temp_dir = tempfile.mkdtemp(prefix="odpo-node-", dir="/tmp")  # short: Ray's socket paths must fit
    args = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus:g}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--min-worker-port={lo}", f"--max-worker-port={lo + 40}"]
    if num_gpus:
        args.append(f"--num-gpus={num_gpus:g}")
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    if object_store_mb:
        args.append(f"--object-store-memory={object_store_mb << 20}")
    if head_address is None:
        args += ["--head", "--dashboard-host=127.0.0.1", f"--include-dashboard={'true' if dashboard else 'false'}"]
    else:
        args.append(f"--address={head_address}")
    args += [f"--{name}={port}" for name, port in ports.items()]
    with open(Path(temp_dir) / "node.log", "wb") as log:
        proc = subprocess.Popen(args, cwd=cwd, env=node_env(**(env or {})), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return RayNode(proc, ports, temp_dir)


def add_node(nodes: list[RayNode], attempts: int = 3, **kwargs) -> RayNode:
    """Start a node (the head when ``nodes`` is empty, else a worker joining ``nodes[0]``), append
    it to ``nodes`` and wait until it is alive (call it before any node of ``nodes`` is lost). A
    node whose `ray start` gives up is started again: on a loaded machine its raylet can die
    waiting for its dashboard agent (a fixed 15 s in Ray, ray-project/ray#65983)."""
    for attempt in range(1, attempts + 1):
        node = start_node(head_address=nodes[0].gcs if nodes else None, **kwargs)
        nodes.append(node)
        try:
            wait_for_nodes(nodes, len(nodes), starting=node, env=kwargs.get("env"))
            return node
        except NodeStartFailed:
            if attempt == attempts:
                raise
            nodes.remove(node)
            node.stop()


class NodeStartFailed(AssertionError):
    """`ray start` of a node exited before the node joined."""


def count_alive(head: RayNode, env: dict | None = None) -> subprocess.CompletedProcess:
    """Ask the cluster of ``head``, through a short-lived driver, how many of its nodes are alive
    (the count is the last line of stdout)."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False);"
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    return subprocess.run([sys.executable, "-c", code, head.gcs], env=node_env(**(env or {})), capture_output=True,
                          text=True, timeout=120)


def wait_for_nodes(nodes: list[RayNode], count: int, timeout: float = 300, starting: RayNode | None = None,
                   env: dict | None = None) -> None:
    """Wait until the cluster of ``nodes`` (the head first) has ``count`` alive nodes, asked by a
    short-lived driver (``env``: the extra environment that reaches it, e.g. a token); on failure
    the nodes' own logs say why."""
    deadline = time.time() + timeout
    while True:
        out = count_alive(nodes[0], env)
        alive = out.stdout.strip().splitlines()[-1:]
        if out.returncode == 0 and alive == [str(count)]:
            return
        if starting is not None and starting.proc.poll() is not None:
            raise NodeStartFailed(f"`ray start` exited ({starting.proc.returncode}):\n{starting.log_tail(1500)}")
        logs = "\n".join(f"--- node {n.temp_dir} (exit {n.proc.poll()}):\n{n.log_tail(1500)}" for n in nodes)
        assert nodes[0].proc.poll() is None, logs
        assert time.time() < deadline, (f"the cluster did not reach {count} alive nodes in {timeout} s "
                                         f"(alive: {alive}; {out.stderr[-1000:]})\n{logs}")
        time.sleep(2)

"""A real multi-node Ray cluster on this machine, for tests: a head (with the dashboard, so
`ray job submit` works) and worker nodes, each a `ray start --block` process group of its own
with its own --temp-dir and ports. A node is lost the way a spot node is: SIGKILL to its whole
process group (raylet, object store, workers), with no goodbye to the head. Never `ray stop`,
which stops every Ray on the host.

`ray.cluster_utils.Cluster` (Ray's own tests) starts nodes from one Python process and removes
them through its API; here each node is a separate `ray start` process tree, as on a real
cluster, so killing one leaves the others and the driver untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from augment_ray.submit import ray_cli

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a node listens on, free ones picked here (two clusters never collide)."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}"]


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen
    temp_dir: str
    log: IO[str]
    resources: dict[str, float] = field(default_factory=dict)
    node_id: str | None = None

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.process.poll() is None


class LocalRayCluster:
    """Start with `start()`, add nodes with `add_node()`, lose one with `kill_node()`, and
    `stop()` everything at the end (each node by its process group)."""

    def __init__(self, head_cpus: int = 2) -> None:
        self.head_cpus = head_cpus
        self.nodes: list[RayNode] = []
        self.gcs_address = ""
        self.dashboard_url = ""
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    # a driver's and a worker's `python` must be this environment's
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                    # the head declares a silent node dead after ~2 s, not Ray's default ~15 s
                    "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
                    "RAY_health_check_failure_threshold": "4"}
        self.env.pop("RAY_ADDRESS", None)

    # ---- nodes -----------------------------------------------------------------------------

    def _start(self, name: str, args: list[str], resources: dict[str, float]) -> RayNode:
        temp = tempfile.mkdtemp(prefix=f"ar{name[:3]}-", dir="/tmp")  # socket paths stay short
        log = open(Path(temp) / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        command = [ray_cli(), "start", "--block", "--node-ip-address=127.0.0.1",
                   f"--temp-dir={temp}", "--disable-usage-stats", *node_ports(), *args]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        node = RayNode(name, process, temp, log, resources)
        self.nodes.append(node)
        return node

    def start(self) -> LocalRayCluster:
        port, dashboard = free_port(), free_port()
        head = self._start("head", [
            "--head", f"--port={port}", f"--num-cpus={self.head_cpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
        ], {})
        self.gcs_address = f"127.0.0.1:{port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2).close()
                break
            except OSError:
                self._check_starting(head, deadline)
                time.sleep(1)
        head.node_id = self._wait_for_node(head, deadline)
        return self

    def add_node(self, name: str, num_cpus: int = 1,
                 resources: dict[str, float] | None = None) -> RayNode:
        """A worker node joined to the head; returns once the head sees it alive."""
        node = self._start(name, [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"],
                           resources or {})
        node.node_id = self._wait_for_node(node, time.monotonic() + START_TIMEOUT_S)
        return node

    def kill_node(self, node: RayNode) -> None:
        """Lose `node` as a spot node is lost: SIGKILL to every process it runs."""
        with_pids = self.processes_of(node)
        _signal_group(node.process, signal.SIGKILL)
        node.process.wait(timeout=30)
        for pid in with_pids:  # a worker that left the node's process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def processes_of(self, node: RayNode) -> list[int]:
        """PIDs of every live process started for `node` (its command line names its temp dir,
        or it is in the node's process group)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                group = os.getpgid(int(entry.name))
            except (OSError, ProcessLookupError, IndexError):
                continue
            if state != "Z" and (group == node.process.pid or node.temp_dir in cmdline):
                pids.append(int(entry.name))
        return pids

    def alive_nodes(self) -> dict[str, dict[str, Any]]:
        """node id -> the head's record of it, for nodes the head counts as alive."""
        with urllib.request.urlopen(f"{self.dashboard_url}/api/v0/nodes?limit=100",
                                    timeout=10) as response:
            body = json.loads(response.read())
        return {node["node_id"]: node for node in body["data"]["result"]["result"]
                if node["state"] == "ALIVE"}

    def _wait_for_node(self, node: RayNode, deadline: float) -> str:
        known = {n.node_id for n in self.nodes if n.node_id}
        while True:
            try:
                for node_id, record in self.alive_nodes().items():
                    if node_id not in known and _matches(record, node):
                        return node_id
            except (OSError, KeyError, ValueError):
                pass
            self._check_starting(node, deadline)
            time.sleep(0.5)

    def _check_starting(self, node: RayNode, deadline: float) -> None:
        if not node.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"Ray node {node.name} did not start:\n{node.log_text()}")

    def stop(self) -> None:
        """Workers first, then the head: SIGTERM to each process group, SIGKILL after 30 s."""
        for node in reversed(self.nodes):
            if node.alive():
                _signal_group(node.process, signal.SIGTERM)
                try:
                    node.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _signal_group(node.process, signal.SIGKILL)
                    node.process.wait()
            node.log.close()


def _matches(record: dict[str, Any], node: RayNode) -> bool:
    total = record.get("resources_total", {})
    if node.resources:
        return all(total.get(name) == amount for name, amount in node.resources.items())
    return bool(record.get("is_head_node")) == (node.name == "head")


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)

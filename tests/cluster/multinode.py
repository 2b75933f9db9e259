"""A real multi-node Ray cluster on this machine: one ``ray start`` per node, as users do on VMs.

Each node is its own raylet (``ray start --block`` in a process group of its own), all on
127.0.0.1, with a private temp folder, a private auth token and ports of their own, so the cluster
never meets another Ray on the machine. Every port the cluster listens on comes from one block
of consecutive ports picked at once (:func:`port_block`), below the kernel's ephemeral range.
Stopping signals the process groups this module started (never ``ray stop``, which kills every
Ray process on the machine).

Drivers (``openweight cluster up``, :func:`placement_groups`) join with :attr:`env`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.net import port_free

ROOT = Path(__file__).resolve().parents[2]
_WORKER_PORTS = 60
"""Worker processes each node may start (each takes a port of its own range)."""
_NODE_PORTS = 8 + 1 + _WORKER_PORTS
"""Ports of one node: agents, raylet, object manager, the head's Ray client server and dashboard (which
runs headless even with ``--include-dashboard=false``), workers (an inclusive range)."""
SPARE_PORTS = 8
"""Ports of the block left for the tests (Serve's HTTP port, a router, fake providers)."""
_LOWEST = 20000
"""Below: Ray's fixed defaults (6379, 8265, 10001) and its default worker ports (10002-19999)."""
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def port_block(count: int, attempts: int = 100) -> list[int]:
    """``count`` consecutive ports, all free now, between Ray's defaults and the ephemeral range.

    Ports picked one by one with ``bind(("", 0))`` come from the kernel's ephemeral range, where
    every outgoing connection takes its source port and where Ray (``Node._get_unused_port``) and
    vLLM pick their own ports: such a port may be gone, or handed out twice, by the time a node
    binds it. Below that range only an explicit bind takes a port, so a block that is free now
    stays free for the nodes of this cluster.
    """
    top = int(_EPHEMERAL.read_text().split()[0]) if _EPHEMERAL.exists() else 32768
    for _ in range(attempts):
        start = random.randrange(_LOWEST, top - count)
        block = list(range(start, start + count))
        if all(port_free("0.0.0.0", port) for port in block):  # Ray binds every interface
            return block
    raise RuntimeError(f"no {count} consecutive free ports between {_LOWEST} and {top}")


@dataclass(kw_only=True)
class Node:
    num_cpus: int
    node_manager_port: int
    """The raylet's port: ``NodeManagerPort`` in ``ray.nodes()``."""
    metrics_port: int
    """The node's metrics agent (``/metrics``: ``ray_serve_*``, ``ray_vllm_*`` of what runs there)."""
    process: subprocess.Popen[bytes]
    log: Path
    stopped: bool = False


@dataclass(kw_only=True)
class Cluster:
    """Nodes of one Ray cluster; the first is the head."""

    temp_dir: Path
    token_path: Path
    ports: list[int]
    """The cluster's unused ports (:func:`port_block`); :meth:`take_port` hands them out."""
    gcs_port: int = field(init=False)
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gcs_port = self.take_port()

    def take_port(self) -> int:
        """A port of the cluster's block that nothing of the cluster uses (e.g. Serve's HTTP port)."""
        return self.take_ports(1)[0]

    def take_ports(self, count: int) -> list[int]:
        """``count`` consecutive ports of the block, no longer handed out."""
        if len(self.ports) < count:
            raise RuntimeError("the cluster's port block is used up")
        taken, self.ports = self.ports[:count], self.ports[count:]
        return taken

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment of a driver or node of this cluster (our code importable on every node)."""
        return {
            **os.environ,
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }

    def start_node(self, num_cpus: int, *, head: bool = False) -> Node:
        # Every port a node listens on, chosen here: two raylets on one machine must not share any.
        ports = self.take_ports(_NODE_PORTS)
        low = ports[8]  # workers: low ... low + _WORKER_PORTS, the rest of the node's share
        args = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
            f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={ports[0]}", f"--dashboard-agent-grpc-port={ports[1]}",
            f"--metrics-export-port={ports[2]}", f"--runtime-env-agent-port={ports[3]}",
            f"--node-manager-port={ports[4]}", f"--object-manager-port={ports[5]}",
            f"--min-worker-port={low}", f"--max-worker-port={low + _WORKER_PORTS}",
        ]  # fmt: skip
        if head:
            args += ["--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                     f"--ray-client-server-port={ports[6]}", f"--dashboard-port={ports[7]}"]
        else:
            args += [f"--address={self.address}"]
        log = self.temp_dir.parent / f"node-{len(self.nodes)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(num_cpus=num_cpus, node_manager_port=ports[4], metrics_port=ports[2], process=process, log=log)
        self.nodes.append(node)
        return node

    def alive_nodes(self, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """``ray.nodes()`` of the live nodes, read by a driver of its own."""
        code = "print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))"
        return list(driver(self, code, timeout_s=timeout_s))

    def node_of(self, node_id: str) -> Node:
        """The node of this cluster whose Ray node id is ``node_id``."""
        ports = {n["NodeID"]: n["NodeManagerPort"] for n in self.alive_nodes()}
        return next(node for node in self.nodes if node.node_manager_port == ports.get(node_id))

    def wait_nodes(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for node in self.live_nodes:
                if node.process.poll() is not None:
                    raise RuntimeError(f"a Ray node exited: {node.log.read_text()[-2000:]}")
            try:
                if len(self.alive_nodes(timeout_s=30)) >= count:
                    return
            except (DriverError, subprocess.TimeoutExpired):
                pass  # the head is not up yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} Ray nodes did not join in {timeout_s:.0f} s")
            time.sleep(2)

    @property
    def live_nodes(self) -> list[Node]:
        """Nodes not stopped by :meth:`stop_node`."""
        return [node for node in self.nodes if not node.stopped]

    def stop_node(self, node: Node, sig: int = signal.SIGTERM, wait_s: float = 20.0) -> None:
        """Stop one node: its ``ray start`` process group (raylet, workers, engine processes)."""
        node.stopped = True
        try:
            os.killpg(node.process.pid, sig)
            node.process.wait(wait_s)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(wait_s)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.stop_node(node)
        # Workers that left their node's process group (Ray starts some in sessions of their own).
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir.parent, ignore_errors=True)


def start_cluster(cpus: list[int], timeout_s: float = 120.0, spare_nodes: int = 1) -> Cluster:
    """Start a head with ``cpus[0]`` CPUs and a worker node per further entry; wait until all joined.

    The port block also holds ports for ``spare_nodes`` nodes started later (:meth:`Cluster.start_node`)
    and :data:`SPARE_PORTS` for the tests.
    """
    folder = Path(tempfile.mkdtemp(prefix="ow-mn-", dir="/tmp"))  # unix socket paths stay short
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    ports = port_block(1 + (len(cpus) + spare_nodes) * _NODE_PORTS + SPARE_PORTS)
    cluster = Cluster(temp_dir=folder / "ray", token_path=token, ports=ports)
    try:
        cluster.start_node(cpus[0], head=True)
        cluster.wait_nodes(1, timeout_s)
        for num_cpus in cpus[1:]:
            cluster.start_node(num_cpus)
        cluster.wait_nodes(len(cpus), timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


class DriverError(RuntimeError):
    """A driver of :func:`driver` failed (its stderr in the message)."""


_DRIVER = """
import json, sys
import ray
from ray.util import placement_group_table
ray.init(address=sys.argv[1], log_to_driver=False)
"""


def driver(cluster: Cluster, code: str, timeout_s: float = 120.0) -> Any:
    """Run ``code`` in a fresh driver of ``cluster`` (``ray`` and ``json`` imported); parse its last line."""
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER + code, cluster.address],
        env=cluster.env, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    if done.returncode:
        raise DriverError(f"a Ray driver exited with status {done.returncode}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def placement_groups(cluster: Cluster) -> list[dict[str, Any]]:
    """Every created placement group: name, strategy, bundles and each bundle's node (and CPUs)."""
    code = """
cpus = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
groups = []
for pg in placement_group_table().values():
    if pg["state"] != "CREATED":
        continue
    nodes = [pg["bundles_to_node_id"].get(i) for i in sorted(pg["bundles"])]
    groups.append({"name": pg["name"], "strategy": pg["strategy"], "bundles": list(pg["bundles"].values()),
                   "nodes": nodes, "node_cpus": [cpus.get(n) for n in nodes]})
print(json.dumps(groups))
"""
    return list(driver(cluster, code))

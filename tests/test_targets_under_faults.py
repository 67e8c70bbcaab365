"""Faults from the outside, at targets that do not deduplicate: real `ftjobs` processes, real local targets."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from processor import embedded
from processor.errors import CommandFailed
from tests.conftest import SECRET, free_port, signed
from tests.processes import Proc, base_env, http_ready, post, wait_for, write_config
from tests.test_reliability import CountingTarget, bodies, enqueue, logged, send_all, settled, until


def valkeys_on(data_dir: Path) -> list[int]:
    """The pids of valkey-server processes whose socket is in `data_dir` (read from /proc)."""
    needle = str(data_dir.resolve() / "valkey.sock").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"valkey-server" in cmdline and needle in cmdline:
            pids.append(int(proc.name))
    return pids


async def test_a_killed_serve_leaves_no_embedded_valkey_and_the_next_serve_loses_nothing(
    aiohttp_server: Callable[..., Any], tmp_path: Path
) -> None:
    """`ftjobs serve` with no Redis URL (the embedded Valkey), SIGKILLed mid-load (an OOM kill, `kill -9`): the
    embedded server must not outlive it; the next `serve` starts on the same data directory and delivers every
    acknowledged event."""
    target = CountingTarget(delay_s=0.0)
    hook = str((await aiohttp_server(target.app())).make_url("/hook"))
    port = free_port()
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": port, "secrets": [SECRET]},
        worker={"lease_s": 2.0, "block_ms": 100},
        handlers=[{"name": "pipe", "type": "http", "url": hook}],
    )
    env = base_env(FTJOBS_CONFIG=str(config))
    data = tmp_path / ".ftjobs"
    n = 400
    items = bodies(n)
    results: dict[str, int] = {}
    serve = await asyncio.to_thread(Proc, ["serve"], tmp_path, env, "serve-1")
    try:
        await asyncio.to_thread(wait_for, http_ready(port), 30, "serve")
        sending = asyncio.create_task(send_all(port, items, retry_503=False, per_second=n / 4, results=results))
        assert await until(lambda: len(target.received) >= n // 4, 30)
        await asyncio.to_thread(serve.stop, signal.SIGKILL)
        outlived = not await until(lambda: not valkeys_on(data), 30)
        await sending
        serve = await asyncio.to_thread(Proc, ["serve"], tmp_path, env, "serve-2")
        await asyncio.to_thread(wait_for, http_ready(port), 30, "serve again")
        acknowledged = {w for w, status in results.items() if status == 200}
        keys = {f"pipe:{w}" for w in acknowledged}
        assert await until(lambda: keys <= set(target.received), 60)
        assert await asyncio.to_thread(serve.stop, signal.SIGTERM, 60) == 0
        left = valkeys_on(data)
    finally:
        for pid in valkeys_on(data):  # only the servers of this test's own data directory
            os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(serve.stop, signal.SIGKILL)
    twice = sum(c - 1 for c in target.received.values())
    print(
        f"\nFIGURE serve-killed: {len(acknowledged)} acknowledged, {len(keys - set(target.received))} lost, "
        f"{twice} sent twice; the embedded server outlived the SIGKILLed serve: {outlived}, servers left after "
        f"the next serve's SIGTERM: {left}"
    )
    assert not outlived and left == []
    assert keys <= set(target.received)
    assert twice <= 8  # at most the calls in flight at the kill (`concurrency`)


async def test_sigterm_starts_no_new_call_so_the_grace_period_cuts_none_off(
    aiohttp_server: Callable[..., Any], tmp_path: Path, redis_url: str, prefix: str, rclient: redis.Redis
) -> None:
    """SIGTERM while a batch has calls in flight and more waiting: the calls in flight finish within
    `grace_s` and are acknowledged; the waiting entries are not started (they stay pending for the next owner).
    A stop that went on through the batch would start calls the grace period then cuts off: their requests
    reached the target, and the next worker sends them again."""
    target = CountingTarget(delay_s=1.5)
    hook = str((await aiohttp_server(target.app())).make_url("/hook"))
    n = 16
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": free_port()},
        redis={"url": redis_url, "prefix": prefix},
        # A batch of 16 in 2 lanes at 1.5 s lasts 12 s; the calls in flight at the stop need 1.5 s of the 4 s.
        worker={"lease_s": 30.0, "block_ms": 100, "batch_size": n, "grace_s": 4.0},
        handlers=[{"name": "pipe", "type": "http", "url": hook, "concurrency": 2}],
    )
    await enqueue(rclient, prefix, ["pipe"], n)
    env = base_env(FTJOBS_CONFIG=str(config))
    worker = await asyncio.to_thread(Proc, ["work"], tmp_path, env, "work-1")
    try:
        assert await until(lambda: target.in_flight() == 2, 30)
        assert await asyncio.to_thread(worker.stop, signal.SIGTERM, 30) == 0
        cut_off = [line.get("cut_off") for line in worker.lines() if line.get("event") == "worker_stopped"]
        before_restart = sum(target.received.values())
        worker = await asyncio.to_thread(Proc, ["work"], tmp_path, env, "work-2")

        async def done() -> bool:
            return len(target.received) == n and await settled(rclient, prefix)

        assert await until(done, 60)
        assert await logged(worker, "worker_started")
    finally:
        await asyncio.to_thread(worker.stop, signal.SIGKILL)
    resent = sum(c - 1 for c in target.received.values())
    print(
        f"\nFIGURE sigterm-slow-target: {n} calls, SIGTERM with 2 in flight: {before_restart} made before the "
        f"restart, cut off {cut_off}, {resent} sent twice"
    )
    assert resent == 0, target.received


async def test_serve_recovers_or_exits_when_its_embedded_valkey_dies(tmp_path: Path) -> None:
    """The embedded Valkey dies under a running `serve` (the OOM killer picks the process holding the data):
    `serve` starts it again (replaying the AOF) and accepts webhooks again, without a restart of its own. It
    used to stay up, `/healthz` 200, answering every webhook 503 for good."""
    port = free_port()
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": port, "secrets": [SECRET]},
        worker={"lease_s": 2.0, "block_ms": 100},
        handlers=[{"name": "log", "type": "log"}],
    )
    env = base_env(FTJOBS_CONFIG=str(config))
    body = bodies(1)[0][1]
    serve = await asyncio.to_thread(Proc, ["serve"], tmp_path, env, "serve")
    try:
        await asyncio.to_thread(wait_for, http_ready(port), 30, "serve")
        assert (await asyncio.to_thread(post, port, body, signed(body)))[0] == 200
        [server] = valkeys_on(tmp_path / ".ftjobs")
        os.kill(server, signal.SIGKILL)

        async def recovered_or_exited() -> bool:
            if serve.process.poll() is not None:
                return True
            return (await asyncio.to_thread(post, port, body, signed(body)))[0] == 200

        settled_ = await until(recovered_or_exited, 30)
        code = serve.process.poll()
        # The server answers a webhook a moment before `serve` logs that it came back: wait for the line.
        restarted = await until(lambda: logged(serve, "embedded_valkey_restarted"), 30)
    finally:
        for pid in valkeys_on(tmp_path / ".ftjobs"):
            os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(serve.stop, signal.SIGKILL)
    assert settled_ and code is None, "serve stayed up answering 503, its embedded Valkey gone"
    assert restarted, "serve answered again without starting its embedded Valkey again"


async def test_serve_exits_1_when_its_embedded_valkey_keeps_dying(tmp_path: Path) -> None:
    """A server that dies again after each restart (an OOM kill every time it has replayed its AOF) is not
    restarted forever: after 3 restarts within 5 minutes `serve` exits 1 for its supervisor, saying why."""
    port = free_port()
    log_handler = {"name": "log", "type": "log"}
    receiver = {"port": port, "secrets": [SECRET]}
    config = write_config(tmp_path / "ftjobs.toml", receiver=receiver, handlers=[log_handler])
    serve = await asyncio.to_thread(Proc, ["serve"], tmp_path, base_env(FTJOBS_CONFIG=str(config)), "serve")
    try:
        await asyncio.to_thread(wait_for, http_ready(port), 30, "serve")
        for restarts in range(1, 4):
            [server] = valkeys_on(tmp_path / ".ftjobs")
            os.kill(server, signal.SIGKILL)

            async def restarted(n: int = restarts) -> bool:
                return sum(line["event"] == "embedded_valkey_restarted" for line in serve.lines()) >= n

            assert await until(restarted, 30)
        [server] = valkeys_on(tmp_path / ".ftjobs")
        os.kill(server, signal.SIGKILL)  # the fourth death within the window
        code = await asyncio.to_thread(serve.process.wait, 30)
    finally:
        for pid in valkeys_on(tmp_path / ".ftjobs"):
            os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(serve.stop, signal.SIGKILL)
    assert code == 1
    assert any(line["event"] == "embedded_valkey_lost" for line in serve.lines())


def test_a_second_serve_on_one_data_directory_is_refused(tmp_path: Path) -> None:
    """One `serve` owns a data directory's server; a second one says so instead of attaching to it (it would
    be left answering 503 when the first one's server goes)."""
    first = embedded.claim(tmp_path / "data")
    try:
        with pytest.raises(CommandFailed, match=r"another `ftjobs serve` \(or its server\) holds") as refused:
            embedded.claim(tmp_path / "data", wait_s=0.2)
        assert refused.value.code == 1  # a runtime condition (exit 1), not bad configuration (exit 2)
    finally:
        first.close()
    embedded.claim(tmp_path / "data").close()  # free again once the first one is gone


def test_the_claim_lasts_as_long_as_the_server_even_a_frozen_one(tmp_path: Path) -> None:
    """The server holds the claim too: a `serve` killed while its server is still shutting down (frozen by a
    slow disk: SIGSTOP here) leaves the data directory claimed until that server is gone, so the next `serve`
    cannot start a second server on the same AOF (it judged "gone" by a PING that timed out before)."""
    lock = embedded.claim(tmp_path / "data")
    server = embedded.EmbeddedValkey(tmp_path / "data", lock=lock)
    server.start()
    lock.close()  # the `serve` that claimed it is gone; its server is not
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(CommandFailed, match="holds"):
            embedded.claim(tmp_path / "data", wait_s=0.7)
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.stop()
    embedded.claim(tmp_path / "data").close()


def test_a_server_nobody_owns_is_not_attached_to(tmp_path: Path) -> None:
    """A server answering on the socket without holding the claim (started by hand, or by an older version)
    is not attached to: a clear error instead."""
    server = embedded.EmbeddedValkey(tmp_path / "data")
    server.start()
    try:
        with pytest.raises(CommandFailed, match="though no `ftjobs serve` runs it"):
            embedded.claim(tmp_path / "data", wait_s=0.2)
    finally:
        server.stop()
    embedded.claim(tmp_path / "data").close()

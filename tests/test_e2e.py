"""End to end, as a user runs it: real `ftjobs` processes, a real Redis/Valkey, signed HTTP requests."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import msgspec

from processor.eventrecord import decode_event
from processor.models import FineTuningJob
from tests.clients import sync_client
from tests.conftest import SECRET, compact, free_port, sample, signed, sink
from tests.processes import FTJOBS, Proc, base_env, http_ready, post, wait_for, write_config


def test_new_user_serve_then_send_shows_the_event(tmp_path: Path, procs: Callable[..., Proc]) -> None:
    """No Redis URL, no secret, no config: `ftjobs serve` then `ftjobs send` (embedded Valkey, local secret)."""
    port = free_port()
    env = base_env(FTJOBS_CONFIG="")
    serve = procs(["serve", "--port", str(port)], tmp_path, env, "serve")
    wait_for(http_ready(port), what="serve ready")
    sent = subprocess.run(
        [*FTJOBS, "send", "--url", f"http://127.0.0.1:{port}/webhooks/openai", "--status", "failed"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert sent.returncode == 0, sent.stderr
    assert "200" in sent.stdout and '"status":"accepted"' in sent.stdout
    wait_for(lambda: any(line.get("event") == "event_received" for line in serve.lines()), what="event logged")
    [line] = [line for line in serve.lines() if line.get("event") == "event_received"]
    assert line["status"] == "failed" and line["error_code"] == "invalid_training_file"
    assert line["handler"] == "log" and line["job_id"] == "ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD" and line["webhook_id"]
    status = subprocess.run(
        [*FTJOBS, "status", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert json.loads(status.stdout)["events"] == 1
    assert serve.stop() == 0
    assert (tmp_path / ".ftjobs" / "appendonlydir").is_dir()
    assert "using_local_webhook_secret" in serve.output()
    secret = (tmp_path / ".ftjobs" / "webhook-secret").read_text().strip()
    assert secret not in serve.output() and secret not in sent.stdout + sent.stderr


def test_killed_worker_loses_nothing(
    tmp_path: Path, procs: Callable[..., Proc], redis_url: str, prefix: str, rclient: object
) -> None:
    """SIGKILL the worker mid-handler: a new worker takes the event over after the lease; one side effect."""
    port = free_port()
    handler = sink("sink", redis_url, prefix, sleep_s=3.0)
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": port, "secrets": [SECRET]},
        redis={"url": redis_url, "prefix": prefix},
        worker={"lease_s": 2.0, "block_ms": 200},
        handlers=[handler],
    )
    env = base_env(FTJOBS_CONFIG=str(config))
    client = sync_client(redis_url)
    try:
        procs(["receive"], tmp_path, env, "receive")
        wait_for(http_ready(port), what="receiver ready")
        first = procs(["work"], tmp_path, env, "work1")
        body = compact(sample("fine_tuning_job.succeeded.json"))
        status, answer = post(port, body, signed(body, "wh_kill"))
        assert (status, answer["status"]) == (200, "accepted")
        wait_for(lambda: client.llen(f"{prefix}:{{sink:sink}}:starts") == 1, what="handler started")
        first.stop(signal.SIGKILL)
        assert client.llen(f"{prefix}:{{sink:sink}}") == 0  # killed before its side effect
        procs(["work"], tmp_path, env, "work2")
        wait_for(lambda: client.llen(f"{prefix}:{{sink:sink}}") == 1, timeout=20, what="redelivery")
        event = decode_event(client.lindex(f"{prefix}:{{sink:sink}}", 0))  # type: ignore[arg-type]
        assert event.job == msgspec.json.decode(body, type=FineTuningJob)
        assert client.llen(f"{prefix}:{{sink:sink}}:starts") == 2
        assert client.hget(f"{prefix}:{{sink:sink}}:count", "wh_kill") == b"1"
    finally:
        client.close()


def test_sigterm_finishes_in_flight_work(
    tmp_path: Path, procs: Callable[..., Proc], redis_url: str, prefix: str, rclient: object
) -> None:
    port = free_port()
    handler = sink("sink", redis_url, prefix, sleep_s=1.0, idempotent=False)
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": port, "secrets": [SECRET]},
        redis={"url": redis_url, "prefix": prefix},
        worker={"lease_s": 2.0, "block_ms": 200, "grace_s": 10.0},
        handlers=[handler],
    )
    env = base_env(FTJOBS_CONFIG=str(config))
    client = sync_client(redis_url)
    try:
        serve = procs(["serve"], tmp_path, env, "serve")
        wait_for(http_ready(port), what="serve ready")
        body = compact(sample("fine_tuning_job.failed.json"))
        assert post(port, body, signed(body, "wh_term"))[0] == 200
        wait_for(lambda: client.llen(f"{prefix}:{{sink:sink}}:starts") == 1, what="handler started")
        assert serve.stop(signal.SIGTERM) == 0
        assert client.hget(f"{prefix}:{{sink:sink}}:count", "wh_term") == b"1"
        assert client.xpending(f"{prefix}:{{p0}}:events", "sink")["pending"] == 0
    finally:
        client.close()


def test_worker_serves_metrics(
    tmp_path: Path, procs: Callable[..., Proc], redis_url: str, prefix: str, rclient: object
) -> None:
    import urllib.request

    port = free_port()
    config = write_config(tmp_path / "ftjobs.toml", redis={"url": redis_url, "prefix": prefix})
    procs(["work", "--metrics-port", str(port)], tmp_path, base_env(FTJOBS_CONFIG=str(config)), "work")

    def scraped() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
                return b"# TYPE ftjobs_deliveries_total counter" in resp.read()
        except OSError:
            return False

    wait_for(scraped, what="metrics endpoint")
    assert listening_on(port) == ["127.0.0.1"]  # loopback unless receiver.metrics_host says otherwise


def listening_on(port: int) -> list[str]:
    """The IPv4 addresses a local TCP port listens on, from the kernel's socket table."""
    addresses = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            addresses.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses

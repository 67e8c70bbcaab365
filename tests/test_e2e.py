"""End to end, as a user runs it: real `ftjobs` processes, a real Redis/Valkey, signed HTTP requests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from processor.models import FineTuningJob, decode_event
from tests.conftest import ROOT, SECRET, compact, free_port, sample, signed

FTJOBS = [sys.executable, "-m", "processor"]


def write_config(path: Path, **tables: Any) -> Path:
    """A TOML config from plain tables (`handlers` is a list of tables)."""
    lines: list[str] = []
    for name, table in tables.items():
        if name == "handlers":
            continue
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    for handler in tables.get("handlers", []):
        lines.append("[[handlers]]")
        for k, v in handler.items():
            if isinstance(v, dict):
                inner = ", ".join(f"{ik} = {json.dumps(iv)}" for ik, iv in v.items())
                lines.append(f"{k} = {{ {inner} }}")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class Proc:
    """A running `ftjobs` subprocess whose output goes to a file we can read at any time."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], name: str) -> None:
        self.log = cwd / f"{name}.log"
        self.handle = open(self.log, "wb")  # noqa: SIM115 -- closed in stop(), after the process ended
        self.process = subprocess.Popen(
            [*FTJOBS, *args], cwd=cwd, env=env, stdout=self.handle, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log.read_text()

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):  # a traceback or aiohttp's own text
                out.append(json.loads(line))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.handle.close()
        return code


@pytest.fixture
def procs() -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(args: list[str], cwd: Path, env: dict[str, str], name: str) -> Proc:
        proc = Proc(args, cwd, env, name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.stop(signal.SIGKILL)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "OPENAI_WEBHOOK_SECRET", "FTJOBS_CONFIG"}}
    env["PYTHONPATH"] = str(ROOT)
    return env | extra


def wait_for(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def http_ready(port: int) -> Callable[[], bool]:
    import urllib.request

    def check() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    return check


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/openai", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


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
    handler = {
        "name": "sink",
        "type": "tests.sinks:Sink",
        "redis_url": redis_url,
        "key": f"{prefix}:sink",
        "sleep_s": 3.0,
    }
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": port, "secrets": [SECRET]},
        redis={"url": redis_url, "prefix": prefix},
        worker={"lease_s": 2.0, "block_ms": 200},
        handlers=[handler],
    )
    env = base_env(FTJOBS_CONFIG=str(config))
    client = redis.Redis.from_url(redis_url)
    try:
        procs(["receive"], tmp_path, env, "receive")
        wait_for(http_ready(port), what="receiver ready")
        first = procs(["work"], tmp_path, env, "work1")
        body = compact(sample("fine_tuning_job.succeeded.json"))
        status, answer = post(port, body, signed(body, "wh_kill"))
        assert (status, answer["status"]) == (200, "accepted")
        wait_for(lambda: client.llen(f"{prefix}:sink:starts") == 1, what="handler started")
        first.stop(signal.SIGKILL)
        assert client.llen(f"{prefix}:sink") == 0  # killed before its side effect
        procs(["work"], tmp_path, env, "work2")
        wait_for(lambda: client.llen(f"{prefix}:sink") == 1, timeout=20, what="redelivery")
        event = decode_event(client.lindex(f"{prefix}:sink", 0))  # type: ignore[arg-type]
        assert event.job == msgspec.json.decode(body, type=FineTuningJob)
        assert client.llen(f"{prefix}:sink:starts") == 2
        assert client.hget(f"{prefix}:sink:count", "wh_kill") == b"1"
    finally:
        client.close()


def test_sigterm_finishes_in_flight_work(
    tmp_path: Path, procs: Callable[..., Proc], redis_url: str, prefix: str, rclient: object
) -> None:
    port = free_port()
    handler = {
        "name": "sink",
        "type": "tests.sinks:Sink",
        "redis_url": redis_url,
        "key": f"{prefix}:sink",
        "sleep_s": 1.0,
        "idempotent": False,
    }
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": port, "secrets": [SECRET]},
        redis={"url": redis_url, "prefix": prefix},
        worker={"lease_s": 2.0, "block_ms": 200, "grace_s": 10.0},
        handlers=[handler],
    )
    env = base_env(FTJOBS_CONFIG=str(config))
    client = redis.Redis.from_url(redis_url)
    try:
        serve = procs(["serve"], tmp_path, env, "serve")
        wait_for(http_ready(port), what="serve ready")
        body = compact(sample("fine_tuning_job.failed.json"))
        assert post(port, body, signed(body, "wh_term"))[0] == 200
        wait_for(lambda: client.llen(f"{prefix}:sink:starts") == 1, what="handler started")
        assert serve.stop(signal.SIGTERM) == 0
        assert client.hget(f"{prefix}:sink:count", "wh_term") == b"1"
        assert client.xpending(f"{prefix}:events", "sink")["pending"] == 0
    finally:
        client.close()

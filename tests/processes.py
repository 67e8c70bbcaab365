"""Running `ftjobs` as separate processes in tests: configs, process handles, readiness and plain HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

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

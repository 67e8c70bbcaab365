"""Log output as an operator reads it: one JSON object a line from every library, useful keys first on a
console, and a `listening` line once a server is up."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import SECRET, free_port
from tests.processes import ROOT, Proc, base_env, wait_for, write_config

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_receive_logs_listening_and_only_json_even_for_aiohttp_errors(
    tmp_path: Path, procs: Callable[..., Proc], redis_url: str, prefix: str, rclient: object
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": port, "host": "127.0.0.1", "secrets": [SECRET]},
        redis={"url": redis_url, "prefix": prefix},
        log={"format": "json"},
    )
    proc = procs(["receive"], tmp_path, base_env(FTJOBS_CONFIG=str(config)), "receive")
    wait_for(lambda: any(line.get("event") == "listening" for line in proc.lines()), what="a listening line")
    [listening] = [line for line in proc.lines() if line.get("event") == "listening"]
    assert listening["address"] == f"http://127.0.0.1:{port}"
    # A request aiohttp itself rejects (both framings at once): one info line from aiohttp, no traceback.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.0 400")
    wait_for(lambda: "bad request refused (400)" in proc.output(), what="aiohttp's line")
    assert proc.stop() == 0
    lines = proc.output().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), proc.output()
    [refused] = [json.loads(line) for line in lines if "bad request refused (400)" in line]
    assert refused["logger"] == "aiohttp.server" and refused["level"] == "info"
    assert "exception" not in refused and "Transfer-Encoding" in refused["event"]


def test_console_lines_start_with_event_handler_job_and_status(tmp_path: Path) -> None:
    code = (
        "from processor import logs; import structlog; logs.configure('info', 'console'); "
        "structlog.get_logger().info('delivered', attempt=1, duration_ms=3, status='succeeded', "
        "job_id='ftjob-1', handler='slack', webhook_id='wh_1')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60, check=True
    )
    line = _ANSI.sub("", out.stderr).strip()
    words = line.split()
    start = words.index("delivered")
    assert words[start + 1 : start + 4] == ["handler=slack", "job_id=ftjob-1", "status=succeeded"], line
    assert words[start + 4 :] == ["attempt=1", "duration_ms=3", "webhook_id=wh_1"], line


def test_console_lines_escape_control_characters_a_sender_wrote(tmp_path: Path) -> None:
    """On a terminal, a job status with an escape sequence and a newline is shown escaped: one line, and the
    renderer's own colours are the only escape sequences."""
    code = (
        "from processor import logs; import structlog; logs.configure('info', 'console'); "
        "structlog.get_logger().info('event_skipped', status='\\x1b]0;pwned\\x07\\nfake line')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60, check=True
    )
    line = _ANSI.sub("", out.stderr).strip()
    # Escaped (newer structlog quotes the escaped text again; structlog 24 printed values raw).
    assert "\n" not in line and "\x07" not in line and "\x1b" not in line, repr(line)
    assert "x1b]0;pwned" in line and "x07" in line and "fake line" in line, line

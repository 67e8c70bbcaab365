"""Load generators: wrk with pre-signed requests (each with its own `webhook-id`), or a Python fallback.

The same requests go to every target, so the ratios compare servers, not clients. Requests are signed
ahead of time (wrk cannot compute HMACs); there are more of them than a run can send, so none repeats.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from bench import rawclient
from processor import signatures

WRK_SCRIPT = """
local dir = os.getenv("FTJOBS_BENCH_DATA")
local file = io.open(dir .. "/body.json", "rb")
local data = {body = file:read("*a"), reqs = {}}
file:close()
for line in io.lines(dir .. "/signed.txt") do
  local id, ts, sig = line:match("^(%S+) (%S+) (%S+)$")
  data.reqs[#data.reqs + 1] = {id, ts, sig}
end
local counter = 0
local nthreads = 0
function setup(thread)
  thread:set("offset", nthreads)
  nthreads = nthreads + 1
  thread:set("step", 0)
end
function init(args)
  step = tonumber(os.getenv("FTJOBS_BENCH_THREADS"))
end
function request()
  local r = data.reqs[((offset + counter * step) % #data.reqs) + 1]
  counter = counter + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["webhook-id"] = r[1],
                    ["webhook-timestamp"] = r[2], ["webhook-signature"] = r[3]}, data.body)
end
"""


class Requests(msgspec.Struct):
    body: bytes
    #: (webhook-id, timestamp, signature) per request.
    signed: list[tuple[str, str, str]]


def presign(body: bytes, secret: str, count: int) -> Requests:
    key = signatures.parse_secret(secret)
    now = str(int(time.time()))
    run = uuid.uuid4().hex[:8]
    out = []
    for i in range(count):
        msg_id = f"wh_{run}_{i}"
        out.append((msg_id, now, signatures.sign(key, msg_id, now, body)))
    return Requests(body=body, signed=out)


class Result(msgspec.Struct):
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, requests: Requests, seconds: float, connections: int = 64, threads: int = 1) -> Result:
    """One wrk run against `url`; latencies from wrk's own distribution."""
    with tempfile.TemporaryDirectory() as tmp:
        # Plain files read by the script (a Lua table literal this large exceeds Lua's constant limit).
        (Path(tmp) / "body.json").write_bytes(requests.body)
        (Path(tmp) / "signed.txt").write_text("".join(f"{i} {t} {s}\n" for i, t, s in requests.signed))
        script = Path(tmp) / "signed.lua"
        script.write_text(WRK_SCRIPT)
        env = {"FTJOBS_BENCH_DATA": tmp, "FTJOBS_BENCH_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
        out = subprocess.run(
            [*_wrk_args(threads, connections, seconds), "-s", str(script), url],
            capture_output=True,
            text=True,
            env=env,
            timeout=seconds + 60,
            check=True,
        ).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Result(
        requests=total,
        seconds=seconds,
        rps=rps,
        p50_ms=_wrk_ms(out, "50%"),
        p99_ms=_wrk_ms(out, "99%"),
        errors=(int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, errors.groups())) if errors else 0),
    )


def _wrk_args(threads: int, connections: int, seconds: float) -> list[str]:
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]


def _wrk_ms(out: str, percentile: str) -> float:
    value, unit = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def run_python(url: str, requests: Requests, seconds: float, connections: int = 32) -> Result:
    """The fallback (no wrk): `bench.rawclient`'s lean keep-alive connections in this process, far cheaper per
    request than an HTTP client library, so the client takes less of a small machine from the server."""
    parts = urlsplit(url)
    built = rawclient.build(url, requests.body, requests.signed)
    latencies, errors, elapsed = await rawclient.run(
        parts.hostname or "127.0.0.1", parts.port or 80, built, seconds, connections
    )
    return Result(
        requests=len(latencies),
        seconds=elapsed,
        rps=len(latencies) / elapsed,
        p50_ms=latencies[len(latencies) // 2] if latencies else 0.0,
        p99_ms=latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
        errors=errors,
    )

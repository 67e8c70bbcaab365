"""The `ftjobs` command as a user types it: help, config checks, status, and the compose file's commands."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pty
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from processor.cli import _parser
from processor.records import DeadLetterRecord, QuarantineRecord
from tests.conftest import ROOT, SECRET, free_port

COMMANDS = [
    "serve",
    "receive",
    "work",
    "check-config",
    "poll",
    "jobs",
    "job",
    "dlq",
    "quarantine",
    "status",
    "send",
    "completion",
]


def ftjobs(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,  # never a terminal: `drop --all` must not wait for an answer
        capture_output=True,
        text=True,
        timeout=60,
    )


def fails_cleanly(result: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    """The command exited `code` with `says` on its last stderr line, and no traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert says in result.stderr.strip().splitlines()[-1], result.stderr


def test_help_lists_every_command() -> None:
    result = ftjobs("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    result = ftjobs(command, "--help")
    assert result.returncode == 0 and f"usage: ftjobs {command}" in result.stdout


def test_console_script_is_installed() -> None:
    script = shutil.which("ftjobs", path=str(Path(sys.executable).parent))
    assert script is not None
    assert subprocess.run([script, "--help"], capture_output=True, timeout=60).returncode == 0


def test_check_config_explains_a_typo_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "ftjobs.toml"
    config.write_text('[[handlers]]\nname = "x"\ntype = "log"\nwhen = { status = 3 }\n')
    result = ftjobs("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "handlers[0].when.status: Expected `str | array`, got `int`" in result.stderr


def test_check_config_never_says_ok_before_an_error(tmp_path: Path) -> None:
    """A malformed `whsec_` secret: exit 2 with the reason, and no "OK" printed first; the secret not echoed."""
    config = tmp_path / "ftjobs.toml"
    config.write_text('[receiver]\nsecrets = ["whsec_!!not-base64-c2VjcmV0"]\n')
    result = ftjobs("check-config", "--config", str(config))
    assert result.returncode == 2 and "not valid base64" in result.stderr
    assert "OK" not in result.stdout and "c2VjcmV0" not in result.stdout + result.stderr


def test_check_config_prints_what_would_run(tmp_path: Path) -> None:
    config = tmp_path / "ftjobs.toml"
    config.write_text(
        '[receiver]\nsecrets = ["whsec_c2VjcmV0LXRoYXQtbXVzdC1ub3QtYmUtcHJpbnRlZA=="]\n'
        '[[handlers]]\nname = "fails"\ntype = "log"\nwhen = { status = ["failed"] }\n'
    )
    result = ftjobs("-c", str(config), "check-config")
    assert result.returncode == 0, result.stderr
    assert "handler fails: type=log" in result.stdout and '"status":["failed"]' in result.stdout
    assert "1 secret(s), signatures required" in result.stdout
    assert "c2VjcmV0" not in result.stdout + result.stderr


def test_receive_without_redis_explains_what_to_do(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "OPENAI_WEBHOOK_SECRET": "whsec_c2VjcmV0"}
    result = ftjobs("receive", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "set REDIS_URL" in result.stderr


def test_send_without_a_secret_explains_what_to_do(tmp_path: Path) -> None:
    result = ftjobs("send", cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "OPENAI_WEBHOOK_SECRET" in result.stderr


def test_status_against_redis(redis_url: str, prefix: str, tmp_path: Path, rclient: object) -> None:
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    config = tmp_path / "ftjobs.toml"
    config.write_text(f'[redis]\nprefix = "{prefix}"\n')
    result = ftjobs("status", "-c", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert "events stream: 0 entries" in result.stdout and "log" in result.stdout
    assert "kept: 0 jobs tracked" in result.stdout and "retention 168 h, dead letters 720 h" in result.stdout


def test_compose_file_services_run_real_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"valkey", "receiver", "worker"} <= set(services)
    valkey = services["valkey"]
    assert "--appendonly" in valkey["command"] and "always" in valkey["command"]
    assert any(v.endswith(":/data") for v in valkey["volumes"])
    parser = _parser()
    for name in ("receiver", "worker"):
        service = services[name]
        args = parser.parse_args(service["command"])  # exits (fails the test) on an unknown command
        assert args.command in COMMANDS
        assert "healthcheck" in service
        # Valkey requires a password, and REDIS_URL carries it.
        assert service["environment"]["REDIS_URL"].startswith("redis://:${VALKEY_PASSWORD:?")
        assert service["environment"]["REDIS_URL"].endswith("@valkey:6379/0")
    # The worker's healthcheck asks the health endpoint its command serves.
    worker = parser.parse_args(services["worker"]["command"])
    assert (
        worker.health_port
        and f"127.0.0.1:{worker.health_port}/healthz" in services["worker"]["healthcheck"]["test"][-1]
    )


def test_deployment_files_are_locked_down() -> None:
    """Valkey has a password, third-party images are pinned at a full version, the image runs as a numeric user."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    valkey = compose["services"]["valkey"]
    command = valkey["command"]
    assert command[command.index("--requirepass") + 1].startswith("${VALKEY_PASSWORD:?")
    assert "$$VALKEY_PASSWORD" in valkey["healthcheck"]["test"][1]  # the health check authenticates too
    dockerfile = (ROOT / "Dockerfile").read_text()
    images = [valkey["image"], *re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)]
    for image in images:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), image
    [user] = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user  # uid:gid, neither of them root


def test_dependency_floors_exclude_known_vulnerable_releases() -> None:
    """aiohttp < 3.14.1 (request smuggling, decompression bombs) and jinja2 < 3.1.6 (sandbox escapes)."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    from packaging.requirements import Requirement
    from packaging.version import Version

    floors = {
        (req := Requirement(line)).name: min(Version(s.version) for s in req.specifier if s.operator == ">=")
        for line in dependencies
        if ">=" in line
    }
    assert floors["aiohttp"] >= Version("3.14.1") and floors["jinja2"] >= Version("3.1.6")


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_file_validates() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "OPENAI_WEBHOOK_SECRET": "whsec_eA==", "VALKEY_PASSWORD": "0f"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_readme_complete_example_is_a_valid_config(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- example: complete -->", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "ftjobs.toml"
    config.write_text(block)
    env = {
        "PATH": "/usr/bin:/bin",
        "OPENAI_WEBHOOK_SECRET": "whsec_c2VjcmV0",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/x",
        "SMTP_PASSWORD": "p",
        "GITHUB_TOKEN": "ghp_x",
    }
    event = ROOT / "processor" / "samples" / "fine_tuning_job.succeeded.json"
    result = ftjobs("check-config", "-c", str(config), "--event", str(event), env=env)
    assert result.returncode == 0, result.stderr
    assert "✗ failures-to-slack: skips it: status 'succeeded'" in result.stdout
    assert "✗ email-the-owner: skips it: metadata['owner'] = None" in result.stdout
    assert "→ eval-after-train: would receive it" in result.stdout


async def test_send_signs_any_sample_to_any_url(aiohttp_server: Any) -> None:
    import asyncio

    import msgspec
    from aiohttp import web

    from processor import signatures
    from tests.conftest import SECRET

    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post("/in", hook)
    server = await aiohttp_server(app)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OPENAI_WEBHOOK_SECRET": SECRET}
    for args in (
        ["--thin", "--status", "cancelled", "--job-id", "ftjob-custom"],
        ["--status", "queued", "--job-id", "ftjob-custom", "--metadata", "team=search", "--webhook-id", "wh_fixed"],
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "processor",
            "send",
            "--url",
            str(server.make_url("/in")),
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert b"200" in out
    (thin_headers, thin_body), (full_headers, full_body) = received
    key = signatures.parse_secret(SECRET)
    assert signatures.verify(thin_headers, thin_body, [key]) and signatures.verify(full_headers, full_body, [key])
    thin = msgspec.json.decode(thin_body)
    assert (thin["type"], thin["data"]["id"], thin["object"]) == ("fine_tuning.job.cancelled", "ftjob-custom", "event")
    full = msgspec.json.decode(full_body)
    assert (full["status"], full["id"], full["metadata"]["team"]) == ("queued", "ftjob-custom", "search")
    assert full_headers["webhook-id"] == "wh_fixed"


OPS = [["status"], ["jobs"], ["job", "ftjob-x"], ["dlq", "list", "log"], ["quarantine", "list"]]


def test_ops_commands_never_start_a_server(tmp_path: Path) -> None:
    """From a folder where no embedded Valkey runs and without REDIS_URL: say so, exit 1, start nothing."""
    for args in OPS[:2]:
        result = ftjobs(*args, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
        fails_cleanly(result, 1, "no embedded Valkey runs in '.ftjobs' and REDIS_URL is not set")
        assert "ftjobs serve" in result.stderr
    assert not (tmp_path / ".ftjobs").exists()


def test_ops_commands_say_redis_is_unreachable(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    for args in OPS:
        result = ftjobs(*args, cwd=tmp_path, env=env)
        fails_cleanly(result, 1, "Redis is unreachable")
        assert len(result.stderr.strip().splitlines()) == 1 and "REDIS_URL" in result.stderr


@pytest.mark.parametrize("command", ["serve", "receive", "dashboard"])
def test_a_port_in_use_is_one_line(command: str, redis_url: str, prefix: str, tmp_path: Path) -> None:
    config = tmp_path / "ftjobs.toml"
    config.write_text(f'[redis]\nprefix = "{prefix}"\n')
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url, "OPENAI_WEBHOOK_SECRET": SECRET}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = ftjobs(command, "-c", str(config), "--host", "127.0.0.1", "--port", port, cwd=tmp_path, env=env)
    fails_cleanly(result, 1, "another process listens there; stop it or choose another --port")


async def test_entry_ids_unknown_ids_replays_and_drop_all(
    redis_url: str, prefix: str, rclient: Any, tmp_path: Path
) -> None:
    config = tmp_path / "ftjobs.toml"
    config.write_text(f'[redis]\nprefix = "{prefix}"\n')
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return ftjobs(*args, "-c", str(config), env=env)

    dead = DeadLetterRecord(entry_id="1-0", record=b"\xc1", error="boom", attempts=3).to_fields()
    letter = (await rclient.xadd(f"{prefix}:{{dlq}}:log", dead)).decode()
    body = QuarantineRecord(body=b"not json", error="bad", webhook_id="wh_q").to_fields()
    kept = (await rclient.xadd(f"{prefix}:{{q}}:quarantine", body)).decode()

    listed = run("dlq", "list", "log")
    assert listed.returncode == 0 and listed.stdout.split()[:5] == ["ID", "EVENT", "JOB", "ATTEMPTS", "ERROR"]
    assert [x["error"] for x in json.loads(run("dlq", "list", "log", "--json").stdout)] == ["boom"]
    assert [x["id"] for x in json.loads(run("quarantine", "list", "--json").stdout)] == [kept]
    fails_cleanly(run("dlq", "show", "log", "not-an-id"), 2, "'not-an-id' is not an entry id")
    fails_cleanly(run("quarantine", "drop", "../x"), 2, "is not an entry id")
    # Beyond 64 bits, or digits of another script: Redis refuses them (these were tracebacks).
    fails_cleanly(run("dlq", "show", "log", "99999999999999999999-0"), 2, "is not an entry id")
    fails_cleanly(run("quarantine", "show", "\u0663-\u0663"), 2, "is not an entry id")
    for action in ("show", "replay", "drop"):
        fails_cleanly(run("dlq", action, "log", "999-0"), 1, "no entry 999-0 in log's dead letters")
    fails_cleanly(run("quarantine", "show", "999-0"), 1, "no entry 999-0 in the quarantine")
    fails_cleanly(run("dlq", "replay", "log", letter), 1, "1 undecodable dead letter(s) kept")
    fails_cleanly(run("quarantine", "replay", kept), 1, f"1 still not readable, kept in quarantine: {kept}")
    fails_cleanly(run("dlq", "drop", "log", "--all"), 2, "not at a terminal, so add --yes")
    assert await rclient.xlen(f"{prefix}:{{dlq}}:log") == 1
    dropped = run("dlq", "drop", "log", "--all", "--yes")
    assert dropped.returncode == 0 and "dropped 1" in dropped.stdout
    assert await rclient.xlen(f"{prefix}:{{dlq}}:log") == 0


async def test_poll_once_with_a_refused_key_is_one_line(aiohttp_server: Any, redis_url: str, tmp_path: Path) -> None:
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "Incorrect API key provided"}}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    server = await aiohttp_server(app)
    config = tmp_path / "ftjobs.toml"
    config.write_text(f'[openai]\nbase_url = "{server.make_url("/v1")}"\n')
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url, "OPENAI_API_KEY": "sk-wrong-key-0123456789"}
    result = await asyncio.to_thread(ftjobs, "poll", "--once", "-c", str(config), env=env)
    fails_cleanly(result, 1, "check OPENAI_API_KEY")
    assert "sk-wrong" not in result.stdout + result.stderr


async def test_send_posts_to_the_configured_host_and_port(tmp_path: Path) -> None:
    from aiohttp import web

    received: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post("/in", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.2", 0)  # not 127.0.0.1: send must follow receiver.host
    await site.start()
    try:
        port = runner.addresses[0][1]
        config = tmp_path / "ftjobs.toml"
        config.write_text(f'[receiver]\nhost = "127.0.0.2"\nport = {port}\npath = "/in"\n')
        env = {"PATH": "/usr/bin:/bin", "OPENAI_WEBHOOK_SECRET": SECRET}
        result = await asyncio.to_thread(ftjobs, "send", "-c", str(config), env=env)
        assert result.returncode == 0, result.stderr
        assert len(received) == 1 and f"http://127.0.0.2:{port}/in" in result.stdout
    finally:
        await runner.cleanup()


async def test_drop_all_at_a_terminal_asks_first(redis_url: str, prefix: str, rclient: Any, tmp_path: Path) -> None:
    config = tmp_path / "ftjobs.toml"
    config.write_text(f'[redis]\nprefix = "{prefix}"\n')
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    await rclient.xadd(f"{prefix}:{{dlq}}:log", DeadLetterRecord(entry_id="1-0", error="boom").to_fields())
    for answer, code, left in ((b"n\n", 1, 1), (b"y\n", 0, 0)):
        leader, follower = pty.openpty()
        try:
            os.write(leader, answer)  # typed ahead: the terminal keeps it until the prompt reads it
            result = await asyncio.to_thread(
                functools.partial(
                    subprocess.run,
                    [sys.executable, "-m", "processor", "dlq", "drop", "log", "--all", "-c", str(config)],
                    stdin=follower,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            )
        finally:
            os.close(follower)
            os.close(leader)
        assert result.returncode == code, result.stderr
        assert "drop all 1 dead letters of log? [y/N]" in result.stdout
        assert await rclient.xlen(f"{prefix}:{{dlq}}:log") == left


def _dead_letter(job_id: str | None, error: str, failed_at: float) -> dict[bytes, bytes]:
    """A dead letter's fields: a decodable failed-job event for `job_id`, or an undecodable record for None."""
    import msgspec

    from processor.eventrecord import encode_event
    from processor.models import Event, decode_body

    record = b"\xc1"
    if job_id is not None:
        job = {**msgspec.json.decode(sample_bytes("fine_tuning_job.failed.json")), "id": job_id}
        event = Event.from_body(decode_body(msgspec.json.encode(job)), webhook_id=f"wh_{job_id}", received_at=failed_at)
        record = encode_event(event)
    return DeadLetterRecord(entry_id="1-0", record=record, error=error, attempts=3, failed_at=failed_at).to_fields()


def sample_bytes(name: str) -> bytes:
    return (ROOT / "processor" / "samples" / name).read_bytes()


async def test_bulk_replay_and_drop_take_filters_and_a_dry_run(
    redis_url: str, prefix: str, rclient: Any, tmp_path: Path
) -> None:
    import time

    from processor.keys import Keys

    keys = Keys(prefix)
    config = tmp_path / "ftjobs.toml"
    config.write_text(f'[redis]\nprefix = "{prefix}"\n')
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return ftjobs(*args, "-c", str(config), env=env)

    now = time.time()
    for fields in (
        *(_dead_letter("ftjob-a", "RetryLater: upstream 503", now - 60) for _ in range(3)),
        *(_dead_letter("ftjob-b", "TimeoutError", now - 3 * 86400) for _ in range(2)),
        _dead_letter(None, "RetryLater: upstream 503", now - 3 * 86400),
    ):
        await rclient.xadd(keys.dlq("log"), fields)

    # --dry-run prints what would be replayed and changes nothing.
    dry = run("dlq", "replay", "log", "--all", "--job", "ftjob-a", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would replay 3 dead letter(s) of log (dry run: nothing changed)" in dry.stdout
    assert dry.stdout.count("ftjob-a") == 3 and "ftjob-b" not in dry.stdout
    assert await rclient.xlen(keys.dlq("log")) == 6 and await rclient.xlen(keys.parts[0].events) == 0
    assert len(json.loads(run("dlq", "list", "log", "--error", "timeout", "--json").stdout)) == 2
    assert "1 dead letter(s) for log matching" in run("dlq", "list", "log", "--error", "503", "--until", "1d").stdout

    # The filters choose among all entries; with named ids they are a usage error, as is a bad time.
    fails_cleanly(run("dlq", "replay", "log", "1-0", "--job", "ftjob-a"), 2, "use them with list or --all")
    fails_cleanly(run("dlq", "list", "log", "--since", "yesterday"), 2, "neither an ISO-8601 time nor an age")
    fails_cleanly(run("dlq", "list", "log", "--dry-run"), 2, "--dry-run goes with replay or drop")

    # Replay the recent 503s: exactly those go back, with progress lines on stderr (not a terminal here).
    replayed = run("dlq", "replay", "log", "--all", "--since", "1h", "--error", "503")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 3 to log" in replayed.stdout and "replayed 3/3" in replayed.stderr
    assert "\r" not in replayed.stderr
    assert await rclient.xlen(keys.dlq("log")) == 3 and await rclient.xlen(keys.parts[0].events) == 3

    # drop --all takes the same filters (and still wants --yes off a terminal).
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 4 * 86400))
    fails_cleanly(run("dlq", "drop", "log", "--all", "--job", "ftjob-b"), 2, "drop --all would delete 2 dead")
    dry = run("dlq", "drop", "log", "--all", "--job", "ftjob-b", "--dry-run")  # a dry run needs no --yes
    assert dry.returncode == 0 and "would drop 2" in dry.stdout
    dropped = run("dlq", "drop", "log", "--all", "--job", "ftjob-b", "--since", since, "--until", "2d", "--yes")
    assert dropped.returncode == 0 and "dropped 2" in dropped.stdout and "dropped 2/2" in dropped.stderr
    [left] = json.loads(run("dlq", "list", "log", "--json").stdout)
    assert left["event"] is None  # only the undecodable one is left


async def test_quarantine_replay_all_takes_filters(redis_url: str, prefix: str, rclient: Any, tmp_path: Path) -> None:
    from processor.keys import Keys

    keys = Keys(prefix)
    config = tmp_path / "ftjobs.toml"
    config.write_text(f'[redis]\nprefix = "{prefix}"\n')
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    readable = json.loads(sample_bytes("fine_tuning_job.failed.json"))
    for job_id in ("ftjob-q1", "ftjob-q2"):
        body = json.dumps({**readable, "id": job_id}).encode()
        await rclient.xadd(
            keys.quarantine, QuarantineRecord(body=body, error="old", webhook_id=f"wh_{job_id}").to_fields()
        )
    dry = ftjobs("quarantine", "replay", "--all", "--job", "ftjob-q2", "--dry-run", "-c", str(config), env=env)
    assert dry.returncode == 0 and "wh_ftjob-q2" in dry.stdout and "wh_ftjob-q1" not in dry.stdout
    assert "would replay 1 quarantined" in dry.stdout and await rclient.xlen(keys.quarantine) == 2
    result = ftjobs("quarantine", "replay", "--all", "--job", "ftjob-q2", "-c", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert "enqueued as fine_tuning.job.failed for ftjob-q2" in result.stdout and "replayed 1/1" in result.stderr
    [left] = json.loads(ftjobs("quarantine", "list", "--json", "-c", str(config), env=env).stdout)
    assert left["webhook_id"] == "wh_ftjob-q1"


async def test_bulk_actions_have_no_cap_and_draw_a_bar_on_a_terminal(
    redis_url: str, prefix: str, rclient: Any, tmp_path: Path
) -> None:
    """More entries than a page (500) and than a chunk (100): every one is handled; on a terminal stderr
    gets a bar redrawn in place, no wider than the terminal."""
    from processor.keys import Keys

    keys = Keys(prefix)
    config = tmp_path / "ftjobs.toml"
    config.write_text(f'[redis]\nprefix = "{prefix}"\n')
    fields = DeadLetterRecord(entry_id="1-0", record=b"\xc1", error="boom", attempts=3).to_fields()
    async with rclient.pipeline(transaction=False) as pipe:
        for _ in range(1203):
            pipe.xadd(keys.dlq("log"), fields)
        await pipe.execute()
    listed = ftjobs("dlq", "list", "log", "-c", str(config), env={"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url})
    assert "1203 dead letter(s) for log" in listed.stdout
    leader, follower = pty.openpty()
    try:
        env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url, "COLUMNS": "60"}
        result = await asyncio.to_thread(
            functools.partial(
                subprocess.run,
                [sys.executable, "-m", "processor", "dlq", "drop", "log", "--all", "--yes", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=follower,
                env=env,
                text=True,
                timeout=60,
            )
        )
        os.set_blocking(leader, False)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(follower)
        os.close(leader)
    assert result.returncode == 0 and "dropped 1203" in result.stdout
    assert await rclient.xlen(keys.dlq("log")) == 0
    frames = drawn.decode().replace("\r\n", "\n").split("\r")
    assert frames[-1].rstrip("\n").endswith("1203/1203 dropped") and frames[-1].startswith("[" + "#" * 10)
    assert len(frames) >= 13 and all(len(frame.rstrip("\n")) <= 60 for frame in frames)


def _complete(script: Path, line: str) -> list[str]:
    """What bash offers for `line` (the cursor at its end), calling the generated completion function the way
    bash's programmable completion does: COMP_WORDS, COMP_CWORD, then the function registered for ftjobs."""
    driver = (
        'source "$1"\n'
        'read -ra COMP_WORDS <<< "$2"\n'
        '[[ "$2" == *" " ]] && COMP_WORDS+=("")\n'
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1)) COMP_LINE=$2 COMP_POINT=${#2}\n"
        'function=$(complete -p ftjobs | sed -E "s/.*-F ([^ ]+).*/\\1/")\n'
        '"$function" ftjobs "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    bash = shutil.which("bash") or "/bin/bash"
    result = subprocess.run([bash, "-c", driver, "_", str(script), line], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return [word for word in result.stdout.splitlines() if word]


def test_bash_completion_is_generated_from_the_parser(tmp_path: Path) -> None:
    generated = ftjobs("completion", "bash")
    assert generated.returncode == 0, generated.stderr
    script = tmp_path / "ftjobs.bash"
    script.write_text(generated.stdout)
    assert _complete(script, "ftjobs dl") == ["dlq"]
    assert _complete(script, "ftjobs dlq ") == ["list", "show", "replay", "drop"]
    assert _complete(script, "ftjobs -c ftjobs.toml quarantine re") == ["replay"]
    assert _complete(script, "ftjobs dlq --job ftjob-x ") == ["list", "show", "replay", "drop"]  # skips a value
    assert {"--all", "--dry-run", "--job", "--since", "--until", "--error"} <= set(
        _complete(script, "ftjobs dlq replay log --")
    )
    assert _complete(script, "ftjobs completion ") == ["bash", "zsh", "fish"]
    assert set(_complete(script, "ftjobs ")) == set(COMMANDS) | {"dashboard"}


def test_zsh_and_fish_completion_scripts() -> None:
    zsh = ftjobs("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef ftjobs\n") and "complete -F _ftjobs" in zsh.stdout
    fish = ftjobs("completion", "fish")
    assert fish.returncode == 0
    assert "complete -c ftjobs -n __fish_use_subcommand -a dlq" in fish.stdout
    assert "-a 'list show replay drop'" in fish.stdout and "-l dry-run" in fish.stdout
    for shell in ("fish", "zsh"):
        if shutil.which(shell):  # the shell parses the script without errors
            checked = subprocess.run([shell, "-n"], input=ftjobs("completion", shell).stdout, text=True, timeout=60)
            assert checked.returncode == 0
    fails_cleanly(ftjobs("completion", "tcsh"), 2, "invalid choice: 'tcsh'")


async def test_sender_text_reaches_the_terminal_escaped(
    aiohttp_client: Any, make_settings: Any, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A signed sender's job status (1-64 characters of anything) shown by `jobs` and `job`: an escape
    sequence or a newline in it is printed as `\\x1b` / `\\x0a`, never sent raw to the operator's terminal."""
    import msgspec

    from processor.receiver import create_app
    from tests.conftest import sample, signed

    hostile = "\x1b[31mRED\x1b]0;title\x07\nx"
    doc = msgspec.json.decode(sample("fine_tuning_job.running.json")) | {"id": "ftjob-term", "status": hostile}
    body = msgspec.json.encode(doc)
    client = await aiohttp_client(create_app(make_settings(), redis_url))
    resp = await client.post("/webhooks/openai", data=body, headers=signed(body))
    assert resp.status == 200, await resp.text()
    config = tmp_path / "ftjobs.toml"
    config.write_text(f'[redis]\nprefix = "{prefix}"\n')
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    for args in (["jobs"], ["job", "ftjob-term"]):
        result = await asyncio.to_thread(ftjobs, *args, "-c", str(config), env=env)
        assert result.returncode == 0, result.stderr
        assert "\\x1b[31mRED\\x1b]0;title\\x07\\x0ax" in result.stdout, result.stdout
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout


@pytest.mark.parametrize("args", [["completion", "fish"], ["check-config"]])
def test_output_into_a_closed_pipe_ends_quietly(args: list[str], tmp_path: Path) -> None:
    """`ftjobs ... | head`: the reader left before the command wrote; no traceback, no 'Exception ignored'."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write into this pipe fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "processor", *args],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 1 and result.stderr == "", result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["serve", "--port", "0"], "argument --port: 0 is not in 1-65535"),
        (["receive", "--port", "70000"], "argument --port: 70000 is not in 1-65535"),
        (["receive", "--workers", "0"], "argument --workers: 0 is not in 1-1000000"),
        (["work", "--health-port", "0"], "argument --health-port: 0 is not in 1-65535"),
        (["work", "--metrics-port", "x"], "argument --metrics-port: 'x' is not a whole number"),
        (["jobs", "--limit", "0"], "argument --limit: 0 is not in 1-1000000"),
        (["jobs", "--limit", "99999999999999999999"], "argument --limit: 99999999999999999999 is not in 1-1000000"),
        (["dashboard", "--port", "-1"], "argument --port: -1 is not in 1-65535"),
    ],
)
def test_ports_and_counts_out_of_range_are_usage_errors(args: list[str], says: str, tmp_path: Path) -> None:
    """Before: `--port 0` fell back to the configured port, `--workers 0` ran one, `jobs --limit 0` said that no
    job was seen and `--limit -1` left the oldest out. Now each is refused before anything starts."""
    fails_cleanly(ftjobs(*args, cwd=tmp_path), 2, says)
    assert not (tmp_path / ".ftjobs").exists()

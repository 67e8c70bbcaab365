"""Configuration: one typed `Settings` object, built once from a TOML file and the environment.

This is the only module that reads `os.environ` (callers pass `env` in). Unknown keys are errors that
name their path (`handlers[1].when.status: ...`), `${VAR}` and `${VAR:-default}` are interpolated in every
string, and the common settings also come straight from the environment:

* `REDIS_URL` — overrides `[redis] url` (empty: the embedded Valkey under `[redis] data_dir`);
* `OPENAI_WEBHOOK_SECRET` — comma-separated `whsec_...` secrets, overrides `[receiver] secrets`;
* `OPENAI_API_KEY` — overrides `[openai] api_key` (hydration and polling);
* `FTJOBS_CONFIG` — the file to read when `--config` is not given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

from processor.errors import ConfigError
from processor.routing import Rule

#: Numbers that must be positive, or at least zero, and a TCP port.
Positive = Annotated[float, Meta(gt=0)]
PositiveInt = Annotated[int, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Port = Annotated[int, Meta(ge=1, le=65535)]

_VAR: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PATH_IN_ERROR: Final = re.compile(r"^(.*) - at (`key` in )?`\$(.*)`$")


class _Config(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base for config tables: a typo is an error, not a silently ignored key."""


class ReceiverSettings(_Config):
    host: str = "0.0.0.0"
    port: Port = 8080
    path: str = "/webhooks/openai"
    #: Standard Webhooks secrets (`whsec_...`); several during a rotation.
    secrets: list[str] = []
    #: Development only: accept unsigned requests. Logs a loud warning at start.
    verify_signatures: bool = True
    #: How far a `webhook-timestamp` may be from our clock (replay protection).
    tolerance_s: PositiveInt = 300
    max_body_bytes: int = 256 * 1024
    #: A client that has not sent its whole body by then gets 408 (slow-body clients hold no worker).
    body_timeout_s: Positive = 10.0
    #: A request whose write Redis has not confirmed by then gets 503 + `Retry-After` (the write may still be
    #: applied; the sender's retry is then a duplicate). Keeps answers fast when Redis stalls.
    enqueue_timeout_s: Positive = 1.0
    #: An idle keep-alive connection is closed after this long, and so is one that has not sent a complete
    #: request head by then. Behind a proxy that pools connections, keep its upstream idle timeout below this.
    idle_timeout_s: Positive = 15.0
    #: Serve `GET /metrics` on its own port instead of the webhook port (0: on the webhook port) ...
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] = 0
    #: ... listening on this address (loopback: scrape it from the host, a sidecar, or an SSH tunnel).
    metrics_host: str = "127.0.0.1"
    #: How long a `webhook-id` is remembered; OpenAI retries for up to 72 h.
    dedupe_window_s: int = 96 * 3600
    #: Up to this many concurrent enqueues share one Redis round trip.
    max_batch: PositiveInt = 256
    #: Event types to enqueue besides `fine_tuning.job.*` (e.g. `batch.completed`); any other is answered
    #: 200 `ignored` and never enqueued.
    accept_event_types: list[str] = []


class RedisSettings(_Config):
    #: `redis://`, `rediss://` or `unix://`; empty starts a private Valkey (the `serve` command).
    url: str = ""
    #: Key prefix, so several ftjobs deployments can share one server.
    prefix: str = "ftjobs"
    #: Where the embedded Valkey keeps its append-only file and socket.
    data_dir: str = ".ftjobs"
    #: Acknowledged events, job state and the jobs index are kept this long for replay and inspection.
    retention_s: PositiveInt = 7 * 24 * 3600
    #: Dead letters and quarantined bodies are kept this long (operators need time to look at them) ...
    dead_letter_retention_s: PositiveInt = 30 * 24 * 3600
    #: ... and at most this many per stream (each handler's dead letters; the quarantine), oldest dropped first.
    max_dead_letters: PositiveInt = 100_000
    #: The events stream is split into this many partitions by job id; each handler consumes a partition in
    #: one worker at a time (a job's events in order, never concurrently). 1 suits one server; 16 or more a
    #: cluster or many workers. To change it on a live system: stop the receivers, let `ftjobs status` show
    #: nothing pending, then restart everything with the new number.
    partitions: Annotated[int, Meta(ge=1, le=1024)] = 1
    #: Whether `url` is a Redis/Valkey Cluster node: "auto" asks the server at start.
    cluster: Literal["auto", "yes", "no"] = "auto"
    #: Answer a webhook only once this many replicas have its write (`WAIT`); 0: once the server has it.
    #: On a cluster, replication is asynchronous: without it, a failover can lose acknowledged events.
    wait_replicas: Annotated[int, Meta(ge=0, le=16)] = 0
    #: Also wait for the write to reach the append-only file on the server and on `wait_replicas` replicas
    #: (`WAITAOF`, Redis 7.2 / Valkey 8 and later).
    wait_aof: bool = False
    #: A write not confirmed within this long is answered 503 (the sender retries; the retry is deduplicated).
    wait_timeout_ms: PositiveInt = 1000


class WorkerSettings(_Config):
    #: A pending entry idle longer than this is taken over from a consumer presumed dead.
    lease_s: Positive = 30.0
    #: On SIGTERM, in-flight handlers get this long to finish before they are cut off (and left pending).
    grace_s: NonNegative = 20.0
    #: An entry taken over this many times (its consumer died each time: it may crash the worker) is
    #: dead-lettered instead of delivered again.
    max_takeovers: PositiveInt = 5
    batch_size: PositiveInt = 64
    block_ms: PositiveInt = 1000
    trim_interval_s: Positive = 60.0
    #: A finished call's ack is retried this long while Redis is away; then the worker exits non-zero.
    ack_deadline_s: Positive = 120.0
    #: `work --health-port` answers 503 when a handler loop made no turn for this long
    #: (0: twice the longest handler `timeout_s`, plus `block_ms`, plus 30 s).
    stuck_after_s: NonNegative = 0.0


class OpenAISettings(_Config):
    #: `OPENAI_API_KEY` overrides it. Needed to hydrate thin webhooks and to poll.
    api_key: str = ""
    base_url: str = "https://api.openai.com/v1"
    organization: str = ""
    project: str = ""
    timeout_s: Positive = 10.0
    #: Retries of one API call on 429/5xx/timeouts before the caller sees the failure.
    max_retries: NonNegativeInt = 2
    #: Fetch the full job for thin webhooks (once per event, shared by every handler).
    hydrate: bool = True
    #: While the API is down, an event waiting for its job is tried again after this long.
    hydrate_retry_s: Positive = 5.0
    #: Poll the API for status changes every N seconds (0: off). The only way to see queued/running.
    poll_interval_s: NonNegative = 0.0
    #: On the poller's first start, announce jobs that already exist (true) or only later changes (false).
    poll_backfill: bool = False
    #: Only poll jobs with these metadata values (`metadata[k]=v` filter).
    poll_metadata: dict[str, str] = {}
    #: Pages of 100 jobs read per poll.
    poll_max_pages: PositiveInt = 2


class LogSettings(_Config):
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: `auto`: console on a terminal, JSON otherwise.
    format: Literal["auto", "json", "console"] = "auto"


class DashboardSettings(_Config):
    """The web dashboard (`/ui/` on `serve` and `receive`, or `ftjobs dashboard` on its own)."""

    #: The operators' token (`Authorization: Bearer`, or the login form). Empty: `serve` and `receive` serve
    #: no dashboard, and `ftjobs dashboard` serves one only on a loopback address, with a local token.
    token: str = ""
    #: Where `ftjobs dashboard` listens (`--host`, `--port` override them).
    host: str = "127.0.0.1"
    port: Port = 8081
    #: How long a login lasts (the signed session cookie's lifetime).
    session_s: PositiveInt = 12 * 3600


#: A dashboard token shorter than this is refused: it is the only thing between the network and replay/drop.
MIN_DASHBOARD_TOKEN: Final = 16


class HandlerSpec(_Config):
    """The keys every `[[handlers]]` table shares; the rest are the handler type's own options."""

    name: str
    type: str
    when: Rule = msgspec.field(default_factory=Rule)
    max_attempts: PositiveInt = 5
    #: How long one call may take: the handler's outgoing request (HTTP, Slack, SMTP) gives up after this
    #: long, and the worker cuts the call off at twice that (`call_limit_s`). A request that timed out after
    #: it was sent may have acted: it is retried with the same `Idempotency-Key`.
    timeout_s: Positive = 10.0
    backoff_s: NonNegative = 1.0
    backoff_max_s: NonNegative = 600.0
    concurrency: PositiveInt = 8
    #: Calls per minute across all workers (0: no limit); calls over it wait for the next minute.
    rate_limit_per_min: NonNegativeInt = 0
    #: Open the circuit after this many consecutive failures (0: no breaker) ...
    breaker_threshold: NonNegativeInt = 0
    #: ... for this long, then let one probe call through.
    breaker_cooldown_s: Positive = 60.0
    #: The handler type's own keys, validated by its `Options` struct when the handler is built.
    options: dict[str, Any] = {}

    @property
    def call_limit_s(self) -> float:
        """The worker's limit on one call: twice the handler's own timeout, room for it to report the timeout
        itself (a hung handler that ignores `timeout_s`, or SMTP's several steps, are still cut off)."""
        return CALL_LIMIT_FACTOR * self.timeout_s


#: How many times its `timeout_s` the worker lets a handler call run.
CALL_LIMIT_FACTOR: Final = 2.0
COMMON_HANDLER_KEYS: Final = frozenset(HandlerSpec.__struct_fields__) - {"options"}


class Settings(_Config):
    receiver: ReceiverSettings = msgspec.field(default_factory=ReceiverSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    openai: OpenAISettings = msgspec.field(default_factory=OpenAISettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    dashboard: DashboardSettings = msgspec.field(default_factory=DashboardSettings)
    handlers: list[HandlerSpec] = msgspec.field(default_factory=lambda: [HandlerSpec(name="log", type="log")])
    #: The file these settings came from, if any (for messages).
    source: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Read `path` (or `$FTJOBS_CONFIG`; neither: defaults), interpolate, apply env overrides, validate."""
        env = os.environ if env is None else env
        path = path or env.get("FTJOBS_CONFIG") or None
        raw: dict[str, Any] = {}
        if path is not None:
            try:
                raw = msgspec.toml.decode(Path(path).read_bytes())
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except msgspec.DecodeError as exc:
                raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_raw(raw, env, source=str(path or ""))

    @classmethod
    def from_raw(cls, raw: dict[str, Any], env: Mapping[str, str], source: str = "") -> Settings:
        """Settings from already-parsed TOML tables (interpolated, env-overridden, validated)."""
        raw = _interpolate(raw, env, "")
        raw.setdefault("redis", {})
        raw.setdefault("receiver", {})
        if env.get("REDIS_URL"):
            raw["redis"]["url"] = env["REDIS_URL"]
        if env.get("OPENAI_API_KEY"):
            raw.setdefault("openai", {})["api_key"] = env["OPENAI_API_KEY"]
        if env.get("OPENAI_WEBHOOK_SECRET"):
            raw["receiver"]["secrets"] = [s.strip() for s in env["OPENAI_WEBHOOK_SECRET"].split(",") if s.strip()]
        if "handlers" in raw:
            raw["handlers"] = [_split_handler(table, i) for i, table in enumerate(raw["handlers"])]
        raw["source"] = source
        settings: Settings = convert(raw, cls)
        settings._check()
        return settings

    def _check(self) -> None:
        names = [h.name for h in self.handlers]
        for i, name in enumerate(names):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ConfigError(f"handlers[{i}].name: {name!r} may only use letters, digits, '_', '.', '-'")
            if name in names[:i]:
                raise ConfigError(f"handlers[{i}].name: {name!r} is used by another handler; names must be unique")
        if self.receiver.max_body_bytes < 1024:
            raise ConfigError("receiver.max_body_bytes: must be at least 1024")
        if self.receiver.dedupe_window_s < 72 * 3600:
            raise ConfigError("receiver.dedupe_window_s: must cover OpenAI's 72 h retry horizon (>= 259200)")
        if self.redis.retention_s < self.receiver.dedupe_window_s:
            raise ConfigError(
                "redis.retention_s: must be at least receiver.dedupe_window_s, so no dedupe marker outlives the "
                f"events it points to ({self.receiver.dedupe_window_s})"
            )
        if not self.receiver.path.startswith("/"):
            raise ConfigError("receiver.path: must start with '/'")
        if self.openai.poll_interval_s > 0 and not self.openai.api_key:
            raise ConfigError("openai.poll_interval_s: polling needs an API key: set OPENAI_API_KEY or openai.api_key")
        if self.openai.poll_interval_s > 0 and not self.openai.hydrate:
            raise ConfigError("openai.poll_interval_s: polling needs openai.hydrate = true")
        if self.dashboard.token and len(self.dashboard.token) < MIN_DASHBOARD_TOKEN:
            raise ConfigError(
                f"dashboard.token: must be at least {MIN_DASHBOARD_TOKEN} characters (e.g. openssl rand -hex 32)"
            )
        if self.receiver.metrics_port and self.receiver.metrics_port == self.receiver.port:
            raise ConfigError("receiver.metrics_port: must differ from receiver.port (0 serves /metrics on it)")


def convert(raw: Any, type_: type[Any], root: str = "") -> Any:
    """`msgspec.convert` with errors rewritten as `path.to.key: what is wrong`."""
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as exc:
        raise ConfigError(explain(exc, root)) from None


def explain(exc: msgspec.ValidationError, root: str = "") -> str:
    """`Expected int, got str - at $.a.b[1]` → `a.b[1]: Expected int, got str` (prefixed by `root`)."""
    match = _PATH_IN_ERROR.match(str(exc))
    what, at = (match.group(1), match.group(3)) if match else (str(exc), "")
    if match and match.group(2):
        what = f"a key: {what}"
    path = (root + at).lstrip(".")
    return f"{path}: {what}" if path else what


def _split_handler(table: Any, index: int) -> Any:
    """Move a handler table's type-specific keys under `options` (validated later by the handler type)."""
    if not isinstance(table, dict):
        return table
    common = {k: v for k, v in table.items() if k in COMMON_HANDLER_KEYS}
    common["options"] = {k: v for k, v in table.items() if k not in COMMON_HANDLER_KEYS}
    return common


def _interpolate(value: Any, env: Mapping[str, str], path: str) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string below `value`."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if default is not None and not env.get(name):
                return default  # shell semantics: `:-` also replaces an empty value
            if name in env:
                return env[name]
            raise ConfigError(f"{path.lstrip('.')}: environment variable {name} is not set (use ${{{name}:-}})")

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value

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
from typing import Any, Final, Literal

import msgspec
from msgspec import Struct

from processor.errors import ConfigError
from processor.routing import Rule

_VAR: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PATH_IN_ERROR: Final = re.compile(r"^(.*) - at (`key` in )?`\$(.*)`$")


class _Config(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base for config tables: a typo is an error, not a silently ignored key."""


class ReceiverSettings(_Config):
    host: str = "0.0.0.0"
    port: int = 8080
    path: str = "/webhooks/openai"
    #: Standard Webhooks secrets (`whsec_...`); several during a rotation.
    secrets: list[str] = []
    #: Development only: accept unsigned requests. Logs a loud warning at start.
    verify_signatures: bool = True
    tolerance_s: int = 300
    max_body_bytes: int = 256 * 1024
    #: A client that has not sent its whole body by then gets 408 (slow-body clients hold no worker).
    body_timeout_s: float = 10.0
    #: How long a `webhook-id` is remembered; OpenAI retries for up to 72 h.
    dedupe_window_s: int = 96 * 3600
    #: Up to this many concurrent enqueues share one Redis round trip.
    max_batch: int = 256


class RedisSettings(_Config):
    #: `redis://`, `rediss://` or `unix://`; empty starts a private Valkey (the `serve` command).
    url: str = ""
    #: Key prefix, so several ftjobs deployments can share one server.
    prefix: str = "ftjobs"
    #: Where the embedded Valkey keeps its append-only file and socket.
    data_dir: str = ".ftjobs"
    #: Acknowledged events are kept this long for replay and inspection, then trimmed.
    retention_s: int = 7 * 24 * 3600


class WorkerSettings(_Config):
    #: A pending entry idle longer than this is taken over from a consumer presumed dead.
    lease_s: float = 30.0
    #: On SIGTERM, in-flight handlers get this long to finish before they are cut off (and left pending).
    grace_s: float = 20.0
    #: An entry taken over this many times (its consumer died each time: it may crash the worker) is
    #: dead-lettered instead of delivered again.
    max_takeovers: int = 5
    batch_size: int = 64
    block_ms: int = 1000
    trim_interval_s: float = 60.0
    #: A finished call's ack is retried this long while Redis is away; then the worker exits non-zero.
    ack_deadline_s: float = 120.0
    #: `work --health-port` answers 503 when a handler loop made no turn for this long
    #: (0: twice the longest handler `timeout_s`, plus `block_ms`, plus 30 s).
    stuck_after_s: float = 0.0


class OpenAISettings(_Config):
    #: `OPENAI_API_KEY` overrides it. Needed to hydrate thin webhooks and to poll.
    api_key: str = ""
    base_url: str = "https://api.openai.com/v1"
    organization: str = ""
    project: str = ""
    timeout_s: float = 10.0
    #: Retries of one API call on 429/5xx/timeouts before the caller sees the failure.
    max_retries: int = 2
    #: Fetch the full job for thin webhooks (once per event, shared by every handler).
    hydrate: bool = True
    #: While the API is down, an event waiting for its job is tried again after this long.
    hydrate_retry_s: float = 5.0
    #: Poll the API for status changes every N seconds (0: off). The only way to see queued/running.
    poll_interval_s: float = 0.0
    #: On the poller's first start, announce jobs that already exist (true) or only later changes (false).
    poll_backfill: bool = False
    #: Only poll jobs with these metadata values (`metadata[k]=v` filter).
    poll_metadata: dict[str, str] = {}
    #: Pages of 100 jobs read per poll.
    poll_max_pages: int = 2


class LogSettings(_Config):
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: `auto`: console on a terminal, JSON otherwise.
    format: Literal["auto", "json", "console"] = "auto"


class HandlerSpec(_Config):
    """The keys every `[[handlers]]` table shares; the rest are the handler type's own options."""

    name: str
    type: str
    when: Rule = msgspec.field(default_factory=Rule)
    max_attempts: int = 5
    timeout_s: float = 30.0
    backoff_s: float = 1.0
    backoff_max_s: float = 600.0
    concurrency: int = 8
    #: Calls per minute across all workers (0: no limit); calls over it wait for the next minute.
    rate_limit_per_min: int = 0
    #: Open the circuit after this many consecutive failures (0: no breaker) ...
    breaker_threshold: int = 0
    #: ... for this long, then let one probe call through.
    breaker_cooldown_s: float = 60.0
    #: The handler type's own keys, validated by its `Options` struct when the handler is built.
    options: dict[str, Any] = {}


COMMON_HANDLER_KEYS: Final = frozenset(HandlerSpec.__struct_fields__) - {"options"}


class Settings(_Config):
    receiver: ReceiverSettings = msgspec.field(default_factory=ReceiverSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    openai: OpenAISettings = msgspec.field(default_factory=OpenAISettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
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
        if not self.receiver.path.startswith("/"):
            raise ConfigError("receiver.path: must start with '/'")


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

"""Per-handler guards kept in Redis, so every worker process shares them: a rate limit and a circuit breaker.

* Rate limit (`rate_limit_per_min`): a fixed one-minute window counter. A call over the limit is deferred to
  the next window; it does not count as a failed attempt.
* Circuit breaker (`breaker_threshold` consecutive failures): the circuit opens for `breaker_cooldown_s`;
  calls meanwhile are deferred (not attempted, not counted). After the cool-down one probe call is let
  through; success closes the circuit, failure opens it again.

Keys (`keys.Keys`): `{p}:rate:{handler}:{minute}` (expires), `{p}:{b:handler}:breaker` (hash: failures,
open_until) and `{p}:{b:handler}:probe`, in one slot.
"""

from __future__ import annotations

import time
from typing import Any

from processor.client import Client, Script
from processor.keys import Keys
from processor.settings import HandlerSpec

#: KEYS: the breaker hash, the probe marker (one slot). ARGV: threshold, open until.
_FAILED = Script("""
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if failures >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'open_until', ARGV[2])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
""")
_SUCCEEDED = Script("""
redis.call('HSET', KEYS[1], 'failures', 0, 'open_until', 0)
redis.call('DEL', KEYS[2])
return 1
""")
#: This minute's calls: count one, and let the counter expire after the next minute.
_COUNT = Script("""
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], 120) end
return n
""")


class Guard:
    """The rate limit and circuit breaker of one handler (a no-op when neither is configured)."""

    def __init__(self, client: Client, keys: Keys, spec: HandlerSpec) -> None:
        self.client = client
        self.spec = spec
        self.rate_key = keys.rate(spec.name)
        self.breaker_key = keys.breaker(spec.name)
        self.probe_key = keys.breaker_probe(spec.name)

    @property
    def active(self) -> bool:
        return bool(self.spec.rate_limit_per_min or self.spec.breaker_threshold)

    async def admit(self, now: float | None = None) -> tuple[float, str] | None:
        """None to go ahead, or (seconds to wait, why) to defer this call."""
        now = time.time() if now is None else now
        if self.spec.breaker_threshold:
            open_until = float(await self.client.hget(self.breaker_key, "open_until") or 0)
            if open_until > now:
                return open_until - now, "circuit open"
            if open_until:  # cool-down over: one probe at a time, the others wait a little
                probe_ms = int(self.spec.breaker_cooldown_s * 1000)
                if not await self.client.set(self.probe_key, 1, nx=True, px=probe_ms):
                    return min(self.spec.breaker_cooldown_s, 5.0), "circuit half-open, probe in flight"
        if self.spec.rate_limit_per_min:
            window = int(now // 60)
            key = f"{self.rate_key}:{window}"
            count = int(await _COUNT(self.client, [key]))
            if count > self.spec.rate_limit_per_min:
                return (window + 1) * 60 - now, "rate limited"
        return None

    async def record(self, ok: bool, now: float | None = None) -> bool:
        """Count a call's outcome; True when this failure opened the circuit."""
        if not self.spec.breaker_threshold:
            return False
        if ok:
            await _SUCCEEDED(self.client, [self.breaker_key, self.probe_key])
            return False
        open_until = (time.time() if now is None else now) + self.spec.breaker_cooldown_s
        opened = await _FAILED(
            self.client, [self.breaker_key, self.probe_key], [self.spec.breaker_threshold, open_until]
        )
        return bool(opened)

    async def state(self, now: float | None = None) -> dict[str, Any]:
        """For `ftjobs status`: the breaker's state and this minute's call count."""
        now = time.time() if now is None else now
        out: dict[str, Any] = {}
        if self.spec.breaker_threshold:
            raw = await self.client.hgetall(self.breaker_key)
            fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
            open_until = float(fields.get("open_until") or 0)
            out["circuit"] = "open" if open_until > now else ("half-open" if open_until else "closed")
            out["consecutive_failures"] = int(fields.get("failures") or 0)
        if self.spec.rate_limit_per_min:
            used = await self.client.get(f"{self.rate_key}:{int(now // 60)}")
            out["rate"] = f"{int(used or 0)}/{self.spec.rate_limit_per_min} per min"
        return out

"""Outgoing HTTP (handlers, API clients): one request, its outcome mapped onto the worker's retry policy.

429 → `RetryLater` after `Retry-After`; 5xx, timeouts and connection errors → `RetryLater`; other
non-success statuses → `PermanentFailure` with the target's answer. A timeout after the request was sent is
an unknown outcome (the target may have acted): it is retried like any timeout, and the retry carries the
same `Idempotency-Key`, so a target that deduplicates on it acts once. Messages name the target by a label
(`slack`, `http:eval-after-train`), never by URL: webhook URLs and query strings carry secrets.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import aiohttp

from processor.errors import PermanentFailure, RetryLater

#: Longest slice of a target's error body carried into a dead letter.
_BODY_EXCERPT = 300


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a `Retry-After` header given in seconds (HTTP dates are rare here; ignored)."""
    value = headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def request(
    session: aiohttp.ClientSession,
    label: str,
    method: str,
    url: str,
    *,
    ok: Collection[int] = (),
    timeout_s: float,
    **kwargs: Any,
) -> tuple[int, str]:
    """Send one request; return (status, body) on success (any 2xx, or a status in `ok`), else raise."""
    try:
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kwargs) as resp:
            body = await resp.text(errors="replace")
            status = resp.status
            headers = resp.headers
    except aiohttp.ConnectionTimeoutError:
        raise RetryLater(f"{label}: could not connect within {timeout_s} s") from None
    except TimeoutError:  # sent, maybe acted on: the retry carries the same Idempotency-Key
        raise RetryLater(f"{label}: no answer within {timeout_s} s (outcome unknown; retried)") from None
    except aiohttp.ClientError as exc:
        raise RetryLater(f"{label}: {type(exc).__name__}") from None
    if status in ok or (not ok and 200 <= status < 300):
        return status, body
    excerpt = body[:_BODY_EXCERPT].strip()
    if status == 429:
        raise RetryLater(f"{label}: rate limited (429) {excerpt}", after=retry_after(headers))
    if status >= 500 or status == 408:
        raise RetryLater(f"{label}: server error {status} {excerpt}", after=retry_after(headers))
    raise PermanentFailure(f"{label}: refused with {status} {excerpt}")

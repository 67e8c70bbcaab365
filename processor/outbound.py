"""Outgoing HTTP (handlers, API clients): one request, its outcome mapped onto the worker's retry policy.

`classify` is the one status policy, shared with the OpenAI client: 429, 408 and 5xx → retry (after
`Retry-After` when given); 3xx → a redirect, never followed; other non-success statuses → refused.
Here that becomes: 429, 408, 5xx, timeouts and connection errors → `RetryLater`; the rest →
`PermanentFailure` with the target's answer. A timeout after the request was sent is
an unknown outcome (the target may have acted): it is retried like any timeout, and the retry carries the
same `Idempotency-Key`, so a target that deduplicates on it acts once. Messages name the target by a label
(`slack`, `http:eval-after-train`), never by URL: webhook URLs and query strings carry secrets.

Redirects are never followed: following one re-sends the request, with its token headers and form body, to
wherever the target points (another host), and turns a POST into a GET that "succeeds" without delivering.
A 3xx is a `PermanentFailure` that names where it pointed (`redirect_target`), so the URL can be fixed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Final, Literal

import aiohttp
from yarl import URL

from processor import tracing
from processor.errors import PermanentFailure, RetryLater

#: Longest slice of a target's error body carried into a dead letter.
_BODY_EXCERPT = 300
#: Longest redirect target carried into a message.
_LOCATION_EXCERPT = 200
#: The most of an answer that is read: a target's answer is a few bytes, the API's a page of jobs. The
#: timeout bounds the time, not the size: an upstream could send gigabytes within it.
MAX_ANSWER_BYTES: Final = 4 << 20


#: What an answer means for whoever sent the request.
Outcome = Literal["ok", "redirect", "retry", "refused"]


def classify(status: int, ok: Collection[int] = ()) -> Outcome:
    """The outcome of an HTTP status: success (any 2xx, or only the statuses in `ok` when given), a redirect
    (not followed), worth retrying (rate limited, timed out on the server, or a server error), or refused."""
    if status in ok or (not ok and 200 <= status < 300):
        return "ok"
    if 300 <= status < 400:
        return "redirect"
    if status in (408, 429) or status >= 500:
        return "retry"
    return "refused"


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
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    if trace_headers := tracing.outgoing_headers():
        kwargs["headers"] = {**(kwargs.get("headers") or {}), **trace_headers}
    try:
        async with session.request(method, url, timeout=timeout, allow_redirects=False, **kwargs) as resp:
            body = _text(await read_answer(resp), resp.charset)
            status = resp.status
            headers = resp.headers
    except aiohttp.ConnectionTimeoutError:
        raise RetryLater(f"{label}: could not connect within {timeout_s} s") from None
    except TimeoutError:  # sent, maybe acted on: the retry carries the same Idempotency-Key
        raise RetryLater(f"{label}: no answer within {timeout_s} s (outcome unknown; retried)") from None
    except aiohttp.ClientError as exc:
        raise RetryLater(f"{label}: {type(exc).__name__}") from None
    outcome = classify(status, ok)
    if outcome == "ok":
        return status, body
    if outcome == "redirect":
        where = redirect_target(headers.get("Location", ""), url)
        raise PermanentFailure(f"{label}: redirected ({status}) to {where}; redirects are not followed")
    excerpt = body[:_BODY_EXCERPT].strip()
    if outcome == "refused":
        raise PermanentFailure(f"{label}: refused with {status} {excerpt}")
    if status == 429:
        raise RetryLater(f"{label}: rate limited (429) {excerpt}", after=retry_after(headers))
    raise RetryLater(f"{label}: server error {status} {excerpt}", after=retry_after(headers))


async def read_answer(resp: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The answer's body, cut after `limit` bytes (the rest is left unread, and the connection closed)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        chunks.append(chunk[: limit - size])
        size += len(chunk)
        if size >= limit:
            resp.close()
            break
    return b"".join(chunks)


def _text(body: bytes, charset: str | None) -> str:
    """An answer as text, in its declared charset; UTF-8 when it names none, one Python does not know, or one
    whose codec raises even with `errors="replace"` (`undefined`, `idna`, `punycode`): a 2xx must stay a
    success whatever its answer says it is written in."""
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except (LookupError, UnicodeError):
        return body.decode("utf-8", errors="replace")


def redirect_target(location: str, ours: str) -> str:
    """Where a redirect pointed, safe for a log line or a dead letter.

    The `Location` is the target's text, and it may repeat our own URL's secrets (a Slack webhook's path is
    its credential; `http://` → `https://` keeps the path). So: scheme, host and port, and the path with
    every segment that also occurs in our URL's path or query replaced by `…`; never user info, query or
    fragment. Anything but printable ASCII is escaped, and the result is cut at 200 characters.
    """
    if not location:
        return "nowhere (no Location header)"
    try:
        base = URL(ours)
        target = base.join(URL(location))
        secret = {part for part in base.raw_path.split("/") if part}
        secret |= {value for value in base.raw_query_string.replace("&", "=").split("=") if value}
        path = "/".join("…" if part in secret else part for part in target.raw_path.split("/"))
        shown = f"{target.scheme}://{target.raw_host or ''}"
        shown += f":{target.explicit_port}" if target.explicit_port is not None else ""
        shown += path
    except ValueError:
        return "an unreadable Location"
    return "".join(c if "!" <= c <= "~" or c == "…" else f"\\u{ord(c):04x}" for c in shown)[:_LOCATION_EXCERPT]

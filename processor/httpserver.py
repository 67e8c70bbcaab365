"""How the receiver's HTTP server runs: the aiohttp server options ftjobs sets on purpose, in one place.

`create_app` stores them on the app (`SERVER_OPTIONS`); `service.run_http` and the tests' servers read them
from there, so the server that is tested is the server that runs.

* `auto_decompress=False`: aiohttp would otherwise inflate `Content-Encoding: gzip/deflate` bodies in the
  protocol layer, before the size limit and the signature: a 200 KB gzip bomb cost ~230 ms of CPU even when
  answered 415 unread, against ~1.5 ms with it off. Standard Webhooks signs the bytes as sent, so the
  receiver answers any encoding but identity with 415 instead.
* `keepalive_timeout` = `receiver.idle_timeout_s`: an idle keep-alive connection is closed after it, and so is a
  connection that has not sent a complete request head by then (aiohttp arms the same timer at connect and
  after each response), which bounds slow-header clients too. Slow bodies are bounded by `body_timeout_s`.
* Header limits: a request line or one header over 8190 bytes, or more than 64 headers, is a 400 from aiohttp
  before any handler runs (Standard Webhooks headers are well under 1 KiB; `signatures` caps them lower still).

* `Expect`: aiohttp answers an `Expect` other than `100-continue` with a 417 whose text repeats the header, and
  a byte 0x80-0xFF in it made building that answer fail: a 500, with a traceback logged, on every path, before
  any middleware runs. `_harden` replaces that default with one that never echoes the header.

Connection counts and request rates are not capped here: that is the reverse proxy's job (see the README).
"""

from __future__ import annotations

import logging
from typing import Any, Final

from aiohttp import hdrs, web, web_urldispatcher
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import HttpVersion11

from processor.settings import ReceiverSettings

SERVER_OPTIONS: Final = web.AppKey("server_options", dict[str, Any])
MAX_LINE_BYTES: Final = 8190
MAX_FIELD_BYTES: Final = 8190
MAX_HEADERS: Final = 64


def server_options(receiver: ReceiverSettings) -> dict[str, Any]:
    """Keyword arguments for `web.run_app` / `web.AppRunner` / aiohttp's `TestServer`.

    Only options every supported aiohttp accepts: an unknown one makes aiohttp drop all of them (with a
    warning), decompression included.
    """
    return {
        "auto_decompress": False,
        "keepalive_timeout": receiver.idle_timeout_s,
        "max_line_size": MAX_LINE_BYTES,
        "max_field_size": MAX_FIELD_BYTES,
        "max_headers": MAX_HEADERS,
    }


class _BadRequestsInOneLine(logging.Filter):
    """aiohttp logs each malformed request head (a control byte in a header, a line over the limit) at error
    level with an 11-line traceback: anyone could flood the log. The client already got its 400; keep one
    info line naming the problem, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "bad request refused (400): %s", (exc.message,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_BAD_REQUESTS: Final = _BadRequestsInOneLine()


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` → `100 Continue` (as aiohttp does); any other expectation → a JSON 417 that
    does not repeat it."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response's size
        return None
    return web.json_response(
        {"error": "expectation_failed", "message": "the only Expect this server meets is 100-continue"},
        status=417,
    )


def application(**options: Any) -> web.Application:
    """A new aiohttp app (`options` as for `web.Application`), made after `_harden`: every ftjobs HTTP server
    (receiver, dashboard, worker health, metrics) is built here, so none misses it."""
    _harden()
    return web.Application(**options)


def _harden() -> None:
    """Install, once per process, what every ftjobs HTTP server needs from aiohttp: the filter on its server
    logger, and the `Expect` handler for every route created from now on (aiohttp takes its default when a
    route is made, including the routes it makes per request for a 404 or 405). Idempotent; `application`
    calls it."""
    logger = logging.getLogger("aiohttp.server")
    if _BAD_REQUESTS not in logger.filters:
        logger.addFilter(_BAD_REQUESTS)
    if not hasattr(web_urldispatcher, "_default_expect_handler"):  # private: an aiohttp that renamed it
        raise RuntimeError("aiohttp has no default Expect handler to replace: check processor.httpserver")
    web_urldispatcher._default_expect_handler = _expect  # type: ignore[assignment]  # private: see the module docstring

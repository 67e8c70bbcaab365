"""The one HTTP status policy, shared by the handlers' requests and the OpenAI client."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from processor import outbound
from processor.openai import OpenAIClient, OpenAIError
from processor.outbound import MAX_ANSWER_BYTES, classify
from processor.settings import OpenAISettings


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "ok"),
        (204, "ok"),
        (301, "redirect"),
        (308, "redirect"),
        (400, "refused"),
        (401, "refused"),
        (404, "refused"),
        (408, "retry"),
        (409, "refused"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
    ],
)
def test_each_status_has_one_meaning(status: int, outcome: str) -> None:
    assert classify(status) == outcome


def test_a_caller_may_name_the_statuses_that_count_as_success() -> None:
    """Airflow answers an existing run id with 409 (the trigger happened); the API client wants 200 only."""
    assert classify(409, ok=(200, 409)) == "ok"
    assert classify(204, ok=(200,)) == "refused"
    assert classify(503, ok=(200,)) == "retry"


class Endless:
    """A target that answers 200 with `total` bytes, streamed, counting what it got to write before the
    client hung up."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.written = 0

    async def answer(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=no-such-charset"})
        await response.prepare(request)
        chunk = b"x" * (1 << 20)
        with contextlib.suppress(ConnectionError):
            while self.written < self.total:
                await response.write(chunk)
                self.written += len(chunk)
            await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.answer)
        return app


async def test_an_answer_is_read_up_to_a_limit(aiohttp_server: Callable[..., Any]) -> None:
    """A target may answer with gigabytes within the timeout: the call still counts (its status is what
    matters), and only the first `MAX_ANSWER_BYTES` are read. An unknown charset is read as UTF-8."""
    target = Endless(total=64 * MAX_ANSWER_BYTES)
    url = str((await aiohttp_server(target.app())).make_url("/hook"))
    async with aiohttp.ClientSession() as session:
        status, body = await outbound.request(session, "http:t", "POST", url, timeout_s=60)
    assert status == 200 and body == "x" * MAX_ANSWER_BYTES
    assert target.written < target.total


async def test_an_api_answer_over_the_limit_is_an_error_not_a_job(aiohttp_server: Callable[..., Any]) -> None:
    """The OpenAI client refuses an answer larger than the limit, rather than holding it all in memory."""
    target = Endless(total=64 * MAX_ANSWER_BYTES)
    url = str((await aiohttp_server(target.app())).make_url("/v1"))
    settings = OpenAISettings(api_key="sk-test", base_url=url, timeout_s=60, max_retries=0)
    async with OpenAIClient(settings) as client:
        with pytest.raises(OpenAIError, match="larger than 4 MiB"):
            await client.retrieve_job("ftjob-big")
    assert target.written < target.total


@pytest.mark.parametrize("charset", ["undefined", "idna", "punycode"])
async def test_a_charset_that_cannot_decode_leniently_is_read_as_utf8(
    aiohttp_server: Callable[..., Any], charset: str
) -> None:
    """Python knows these names, but their codecs refuse `errors="replace"` or any input: the answer is read
    as UTF-8. Raised instead, a 2xx (the call happened) looked failed, and the call was made again."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body="déjà".encode(), headers={"Content-Type": f"text/plain; charset={charset}"})

    app = web.Application()
    app.router.add_post("/hook", answer)
    url = str((await aiohttp_server(app)).make_url("/hook"))
    async with aiohttp.ClientSession() as session:
        assert await outbound.request(session, "http:t", "POST", url, timeout_s=10) == (200, "déjà")

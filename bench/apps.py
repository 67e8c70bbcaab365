"""The two reference servers the benchmark measures ftjobs against, as `python -m bench.apps KIND --port N`.

* `bare` — the limit: an aiohttp app that reads the body and answers 202 (no verification, no Redis).
* `naive` — the hand-rolled reference: msgspec decode + one awaited XADD per request (no signature check,
  no dedupe, no batching).
"""

from __future__ import annotations

import argparse

import msgspec
import redis.asyncio as redis
from aiohttp import web

from processor.models import FineTuningJob
from processor.service import new_loop


def bare_app() -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/webhooks/openai", receive)
    return app


def naive_app(redis_url: str) -> web.Application:
    decoder = msgspec.json.Decoder(FineTuningJob)
    client = redis.Redis.from_url(redis_url)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            decoder.decode(body)
        except msgspec.DecodeError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        await client.xadd("naive:events", {"e": body})
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post("/webhooks/openai", receive)
    return app


async def serve_lowlevel(port: int) -> None:
    """`lowlevel`: what the bare app costs without `web.Application` (no router, no middleware machinery):
    aiohttp's low-level `web.Server` calling one handler. The gap to `bare` is the most a dedicated webhook
    route could save on aiohttp's side."""
    import asyncio

    async def receive(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(status=202)

    runner = web.ServerRunner(web.Server(receive), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["bare", "naive", "lowlevel"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args()
    if args.kind == "lowlevel":
        loop = new_loop()
        loop.run_until_complete(serve_lowlevel(args.port))
        return
    app = bare_app() if args.kind == "bare" else naive_app(args.redis_url)
    # The same event loop ftjobs runs on (uvloop when installed), so the comparison is server against server.
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, loop=new_loop())


if __name__ == "__main__":
    main()

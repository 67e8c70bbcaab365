"""The HTTP trigger handler: generic requests and presets, against local servers that check request shapes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import msgspec
import pytest
from aiohttp import web

from processor import signatures
from processor.keys import Keys
from processor.stream import Streams
from tests.conftest import SECRET, build_fails, compact, eventually, sample
from tests.fake_targets import Recorder, catch_all_app, pipelines_app, redirect_app

SUCCEEDED = "fine_tuning_job.succeeded.json"


def receiver_app(seen: Recorder, status: Callable[[int], int] = lambda n: 200) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        seen.append({"headers": dict(request.headers), "body": await request.read(), "method": request.method})
        return web.Response(status=status(len(seen)), text="answer from target")

    app = web.Application()
    app.router.add_route("*", "/hook", hook)
    return app


async def test_generic_request_with_template_body_key_and_signature(
    rig: Any, aiohttp_server: Callable[..., Any]
) -> None:
    seen: Recorder = []
    server = await aiohttp_server(receiver_app(seen))
    handler = {
        "name": "eval",
        "type": "http",
        "url": str(server.make_url("/hook")),
        "method": "PUT",
        "headers": {"Authorization": "Bearer pipeline-token"},
        "body": '{"model": "{{ job.fine_tuned_model }}", "job": "{{ job.id }}", "tokens": {{ job.trained_tokens }},'
        ' "team": "{{ metadata.team }}"}',
        "sign_secret": SECRET,
        "when": {"status": "succeeded"},
    }
    async with rig([handler]) as r:
        await r.post(compact(sample(SUCCEEDED)), "wh_eval")

        async def called() -> bool:
            return len(seen) == 1

        await eventually(called)
    request = seen[0]
    assert request["method"] == "PUT"
    assert msgspec.json.decode(request["body"]) == {
        "model": "ft:gpt-4.1-mini-2025-04-14:acme-labs:support-dpo-v3:CYk2Lq9R",
        "job": "ftjob-7cQm2VfRZk1LwN8xTa4YpE3u",
        "tokens": 6284512,
        "team": "support-ml",
    }
    headers = request["headers"]
    assert headers["Idempotency-Key"] == "eval:wh_eval"
    assert headers["Authorization"] == "Bearer pipeline-token"
    # The target can verify the request with the shared secret (our verifier and the reference library).
    assert signatures.verify(headers, request["body"], [signatures.parse_secret(SECRET)])
    import standardwebhooks

    standardwebhooks.Webhook(SECRET).verify(request["body"], headers)


async def test_json_body_values_are_escaped(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    seen: Recorder = []
    server = await aiohttp_server(receiver_app(seen))
    doc = msgspec.json.decode(sample(SUCCEEDED))
    doc["metadata"] = {"team": 'x", "admin": true, "y": "{{ 7*7 }}\n'}
    handler = {
        "name": "h",
        "type": "http",
        "url": str(server.make_url("/hook")),
        "body": '{"team": "{{ metadata.team }}"}',
    }
    async with rig([handler]) as r:
        await r.post(msgspec.json.encode(doc))

        async def called() -> bool:
            return len(seen) == 1

        await eventually(called)
    assert msgspec.json.decode(seen[0]["body"]) == {"team": 'x", "admin": true, "y": "{{ 7*7 }}\n'}


async def test_default_body_carries_the_event_and_job(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    seen: Recorder = []
    server = await aiohttp_server(receiver_app(seen))
    async with rig([{"name": "h", "type": "http", "url": str(server.make_url("/hook"))}]) as r:
        await r.post(compact(sample(SUCCEEDED)))

        async def called() -> bool:
            return len(seen) == 1

        await eventually(called)
    body = msgspec.json.decode(seen[0]["body"])
    assert body["type"] == "fine_tuning.job.succeeded" and body["status"] == "succeeded"
    assert body["job"]["fine_tuned_model"].startswith("ft:gpt-4.1-mini")


@pytest.mark.parametrize("status", [307, 308, 302, 301])
async def test_a_redirect_is_not_followed_and_carries_no_secret_elsewhere(
    rig: Any, aiohttp_server: Callable[..., Any], status: int
) -> None:
    """A cross-origin redirect would re-send the API key header and the GitLab token (in the form body) to
    the other host. It is a permanent failure naming where it pointed; the other host receives nothing."""
    elsewhere: Recorder = []
    other = await aiohttp_server(catch_all_app(elsewhere))
    target = await aiohttp_server(redirect_app(lambda: str(other.make_url("/collect?via=redirect")), status=status))
    generic = {
        "name": "generic",
        "type": "http",
        "url": str(target.make_url("/hook?key=query-secret-123")),
        "headers": {"X-Api-Key": "api-key-secret-456"},
    }
    gitlab = {
        "name": "gitlab",
        "type": "http",
        "preset": "gitlab_pipeline",
        "project": "acme/evals",
        "token": "glptt-secret-789",
        "api_url": str(target.make_url("")).rstrip("/"),
    }
    async with rig([generic, gitlab]) as r:
        await r.post(compact(sample(SUCCEEDED)))

        async def both_dead() -> bool:
            return len(await r.dead("generic")) == len(await r.dead("gitlab")) == 1

        await eventually(both_dead)
        errors = [(await r.dead(name))[0][b"error"].decode() for name in ("generic", "gitlab")]
    assert elsewhere == []
    for error in errors:
        assert f"redirected ({status}) to http://127.0.0.1:{other.port}/collect; redirects are not followed" in error
        assert not any(secret in error for secret in ("query-secret-123", "api-key-secret-456", "glptt-secret-789"))


async def test_success_policy_and_permanent_failure(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    seen: Recorder = []
    server = await aiohttp_server(receiver_app(seen, status=lambda n: 202 if n == 1 else 422))
    handler = {"name": "h", "type": "http", "url": str(server.make_url("/hook")), "success_status": [201]}
    async with rig([handler]) as r:
        await r.post(compact(sample(SUCCEEDED)))

        async def dead() -> bool:
            return len(await r.dead("h")) == 1

        await eventually(dead)
        assert b"refused with 202 answer from target" in (await r.dead("h"))[0][b"error"]


async def test_redelivered_event_does_not_trigger_twice(
    rig: Any, aiohttp_server: Callable[..., Any], prefix: str
) -> None:
    seen: Recorder = []
    server = await aiohttp_server(receiver_app(seen))
    async with rig([{"name": "h", "type": "http", "url": str(server.make_url("/hook"))}]) as r:
        await r.post(compact(sample(SUCCEEDED)))

        async def called() -> bool:
            return len(seen) == 1

        await eventually(called)
        await r.redeliver_first()
        await eventually(r.settled)
    assert len(seen) == 1


def preset(name: str, server: Any, **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "http",
        "when": {"status": "succeeded", "metadata": {"team": "support-*"}},
        "api_url": str(server.make_url("")).rstrip("/"),
    } | options


async def test_presets_send_what_each_target_documents(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    seen: Recorder = []
    server = await aiohttp_server(pipelines_app(seen))
    handlers = [
        preset(
            "gh-dispatch",
            server,
            preset="github_repository_dispatch",
            repo="acme/evals",
            token="ghp_test",
            event_type="ft-succeeded",
        ),
        preset(
            "gh-workflow",
            server,
            preset="github_workflow_dispatch",
            repo="acme/evals",
            token="ghp_test",
            workflow="eval.yml",
            ref="main",
            inputs={"model": "{{ job.fine_tuned_model }}", "job": "{{ job.id }}"},
        ),
        preset(
            "gitlab",
            server,
            preset="gitlab_pipeline",
            project="acme/evals",
            token="glptt-test",
            ref="main",
            inputs={"MODEL": "{{ job.fine_tuned_model }}"},
        ),
        preset(
            "airflow",
            server,
            preset="airflow_dag_run",
            dag_id="evaluate_model",
            username="airflow",
            password="secret",
            inputs={"model": "{{ job.fine_tuned_model }}"},
        ),
    ]
    async with rig(handlers) as r:
        await r.post(compact(sample(SUCCEEDED)), "wh_pipe")
        await r.post(compact(sample("fine_tuning_job.failed.json")))  # no trigger for a failure

        async def all_four() -> bool:
            status = await Streams(r.rclient, Keys(r.prefix)).status(h["name"] for h in handlers)
            return len(seen) == 4 and all(
                row["lag"] == 0 and row["pending"] == 0 for row in status["handlers"].values()
            )

        await eventually(all_four)
        for h in handlers:
            assert await r.dead(h["name"]) == []
    by_path = {s["path"]: s for s in seen}
    model = "ft:gpt-4.1-mini-2025-04-14:acme-labs:support-dpo-v3:CYk2Lq9R"
    dispatch = msgspec.json.decode(by_path["/repos/acme/evals/dispatches"]["body"])
    assert dispatch["event_type"] == "ft-succeeded"
    assert dispatch["client_payload"]["fine_tuned_model"] == model
    workflow = msgspec.json.decode(by_path["/repos/acme/evals/actions/workflows/eval.yml/dispatches"]["body"])
    assert workflow == {"ref": "main", "inputs": {"model": model, "job": "ftjob-7cQm2VfRZk1LwN8xTa4YpE3u"}}
    gitlab = by_path["/api/v4/projects/acme%2Fevals/trigger/pipeline"]
    assert parse_qs(gitlab["body"].decode()) == {"token": ["glptt-test"], "ref": ["main"], "variables[MODEL]": [model]}
    airflow = msgspec.json.decode(by_path["/api/v1/dags/evaluate_model/dagRuns"]["body"])
    assert airflow == {"dag_run_id": "ftjobs__airflow:wh_pipe", "conf": {"model": model}}
    assert all(s["headers"]["Idempotency-Key"].endswith(":wh_pipe") for s in seen)


async def test_airflow_duplicate_run_counts_as_done(
    rig: Any, aiohttp_server: Callable[..., Any], rclient: Any, prefix: str
) -> None:
    """Airflow refuses a second run with the same id (409): the trigger happened, so that is success."""
    from handlers.http import HttpHandler, HttpOptions
    from processor.handler import Delivery, HandlerContext
    from processor.models import Event, decode_job

    seen: Recorder = []
    server = await aiohttp_server(pipelines_app(seen))
    options = HttpOptions(
        preset="airflow_dag_run",
        api_url=str(server.make_url("")).rstrip("/"),
        dag_id="d",
        username="airflow",
        password="secret",
    )
    handler = HttpHandler("af", options)
    await handler.setup(HandlerContext(redis=rclient, key_prefix=f"{prefix}:h:af"))
    try:
        event = Event.from_body(decode_job(sample(SUCCEEDED)), webhook_id="wh_x", received_at=time.time())
        delivery = Delivery(event=event, handler="af", attempt=1, idempotency_key="af:wh_x")
        await handler(delivery)
        await handler(delivery)  # raises if the 409 were a failure
    finally:
        await handler.close()
    assert len(seen) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "ftp://x"}, "http:// or https:// URL"),
        ({"url": "https://x", "body": '{"a": {{ job.id }}}'}, "does not render valid JSON"),
        ({"preset": "github_workflow_dispatch", "repo": "acme/evals", "token": "t"}, "needs: workflow"),
        ({"preset": "github_repository_dispatch", "repo": "nope", "token": "t"}, "is not owner/name"),
        ({"preset": "gitlab_pipeline", "project": "1"}, "needs: token"),
        ({"preset": "airflow_dag_run", "dag_id": "d"}, "needs: api_url"),
        ({"url": "https://x", "sign_secret": "whsec_!!"}, "not valid base64"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    build_fails({"name": "h", "type": "http", **options}, message)


async def test_circuit_breaker_opens_then_probes(rig: Any, aiohttp_server: Callable[..., Any], prefix: str) -> None:
    seen: Recorder = []
    server = await aiohttp_server(receiver_app(seen, status=lambda n: 503 if n <= 2 else 200))
    handler = {
        "name": "h",
        "type": "http",
        "url": str(server.make_url("/hook")),
        "breaker_threshold": 2,
        "breaker_cooldown_s": 1.0,
        "backoff_s": 0.01,
        "max_attempts": 10,
    }
    async with rig([handler]) as r:
        from processor.limits import Guard

        guard = Guard(r.rclient, Keys(prefix), r.settings.handlers[0])
        await r.post(compact(sample(SUCCEEDED)))

        async def opened() -> bool:
            return (await guard.state())["circuit"] == "open"

        await eventually(opened)
        calls_when_opened = len(seen)
        assert calls_when_opened == 2

        async def closed() -> bool:
            return len(seen) == 3 and (await guard.state())["circuit"] == "closed"

        await eventually(closed)
        assert await r.dead("h") == []


async def test_rate_limit_defers_without_counting_attempts(
    rig: Any, aiohttp_server: Callable[..., Any], prefix: str
) -> None:
    seen: Recorder = []
    server = await aiohttp_server(receiver_app(seen))
    handler = {
        "name": "h",
        "type": "http",
        "url": str(server.make_url("/hook")),
        "rate_limit_per_min": 2,
        "max_attempts": 1,
    }
    async with rig([handler]) as r:
        for i in range(3):  # three different jobs (the same job twice would be a repeat, not a new event)
            doc = msgspec.json.decode(sample(SUCCEEDED)) | {"id": f"ftjob-rate-{i}"}
            await r.post(msgspec.json.encode(doc))

        async def deferred() -> bool:
            return len(seen) == 2 and await r.rclient.zcard(f"{prefix}:{{p0}}:retry:h") == 1

        await eventually(deferred)
        assert await r.dead("h") == []  # deferred, not failed (max_attempts = 1)
        [(_, due)] = await r.rclient.zrange(f"{prefix}:{{p0}}:retry:h", 0, -1, withscores=True)
        assert 0 < due - time.time() <= 60


async def test_the_handlers_timeout_governs_the_request_and_a_timeout_is_retried_with_the_same_key(
    rig: Any, aiohttp_server: Callable[..., Any]
) -> None:
    """`timeout_s` in the `[[handlers]]` table is the request's own limit (not only the worker's): a target that
    does not answer in time is an unknown outcome, retried with the same `Idempotency-Key`."""
    import asyncio

    seen: Recorder = []
    released = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        seen.append({"headers": dict(request.headers)})
        await released.wait()  # answers only when the test ends
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_post("/slow", slow)
    server = await aiohttp_server(app)
    handler = {
        "name": "eval",
        "type": "http",
        "url": str(server.make_url("/slow")),
        "timeout_s": 0.3,
        "max_attempts": 2,
        "backoff_s": 0.01,
    }
    try:
        async with rig([handler]) as r:
            await r.post(compact(sample(SUCCEEDED)), "wh_slow")

            async def dead() -> bool:
                return len(await r.dead("eval")) == 1

            await eventually(dead)
            [letter] = await r.dead("eval")
            assert letter[b"error"].endswith(b"http:eval: no answer within 0.3 s (outcome unknown; retried)")
            assert [s["headers"]["Idempotency-Key"] for s in seen] == ["eval:wh_slow"] * 2
    finally:
        released.set()

"""Traces (the `otel` extra): one trace from the webhook POST, through the stream, to the handler's outgoing
HTTP request, recorded by the OpenTelemetry SDK's in-memory exporter; and nothing at all without the extra."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import PATH, compact, eventually, sample, signed
from tests.fake_targets import Recorder, catch_all_app
from tests.processes import ROOT, base_env

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")
from opentelemetry import trace  # noqa: E402 -- only with the extra
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The process' tracer provider (set once: OpenTelemetry allows one), exporting to memory."""
    if not isinstance(trace.get_tracer_provider(), sdk.TracerProvider):
        provider = sdk.TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


async def test_one_trace_from_the_post_to_the_outgoing_request(
    rig: Any, aiohttp_server: Callable[..., Any], spans: InMemorySpanExporter
) -> None:
    seen: Recorder = []
    target = await aiohttp_server(catch_all_app(seen))
    sender_trace = "0af7651916cd43dd8448eb211c80319c"
    async with rig([{"name": "h", "type": "http", "url": str(target.make_url("/hook"))}]) as r:
        body = compact(sample("fine_tuning_job.succeeded.json"))
        headers = signed(body) | {"traceparent": f"00-{sender_trace}-b7ad6b7169203331-01"}
        assert (await r.client.post(PATH, data=body, headers=headers)).status == 200

        async def called() -> bool:
            return len(seen) == 1

        await eventually(called)
        await eventually(r.settled)
    by_name = {span.name: span for span in spans.get_finished_spans()}
    server, enqueue, handler = by_name["POST /webhooks/openai"], by_name["ftjobs.enqueue"], by_name["ftjobs.handler h"]
    assert {f"{s.context.trace_id:032x}" for s in (server, enqueue, handler)} == {sender_trace}
    assert enqueue.parent is not None and enqueue.parent.span_id == server.context.span_id
    assert handler.parent is not None and handler.parent.span_id == enqueue.context.span_id
    assert handler.attributes is not None and handler.attributes["ftjobs.job_id"].startswith("ftjob-")
    _, trace_id, parent_id, _ = seen[0]["headers"]["traceparent"].split("-")
    assert (trace_id, parent_id) == (sender_trace, f"{handler.context.span_id:016x}")


def test_without_the_extra_tracing_is_off() -> None:
    """With OpenTelemetry not importable, the receiver and worker get no middleware, no field, no header."""
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from processor import tracing\n"
        "assert not tracing.ENABLED and tracing.middlewares('/x') == [] and tracing.outgoing_headers() == {}\n"
        "with tracing.enqueue_span('wh_1') as fields: assert fields == {}\n"
        "with tracing.handler_span(b'', 'h', 'ftjob-1'): pass\n"
        "print('off')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "off", out.stderr

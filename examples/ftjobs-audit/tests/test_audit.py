"""The plug-in's own tests, written with ftjobs' test kit: no Redis, no worker."""

from __future__ import annotations

import json
from pathlib import Path

from ftjobs_audit import AuditHandler, AuditOptions

from processor.testing import delivery_from_sample, run_through_routing


async def test_audit_appends_one_line_per_routed_event(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    audit = AuditHandler("audit", AuditOptions(path=str(trail)))
    when = {"status": ["succeeded", "failed"]}
    assert not (await run_through_routing(audit, when, delivery_from_sample("running"))).delivered
    failed = delivery_from_sample("failed")
    assert (await run_through_routing(audit, when, failed)).delivered
    [line] = [json.loads(text) for text in trail.read_text().splitlines()]
    assert line["status"] == "failed" and line["job_id"] == failed.event.job_id
    assert line["key"] == failed.idempotency_key

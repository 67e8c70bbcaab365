"""The monitoring files under `deploy/`: they parse, `promtool` accepts the rules, and every metric they use
is one that a live ftjobs scrape exports (a renamed metric would otherwise leave an alert silently empty)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from processor.openai import OpenAIClient
from tests.conftest import ROOT, compact, eventually, make_poller, sample, sink
from tests.fake_openai import KEY, FakeOpenAI
from tests.test_gauges import scrape

ALERTS = ROOT / "deploy" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
_METRIC = re.compile(r"\bftjobs_[a-z_]+\b")


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    [group] = rules["groups"]
    return [rule["expr"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_alerts_cover_what_operators_must_hear_about() -> None:
    names = {rule["alert"] for rule in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]}
    expected = {"FtjobsHandlerLagGrowing", "FtjobsDeadLettersGrowing", "FtjobsCircuitOpen"}
    assert expected | {"FtjobsPollerFailing", "FtjobsNoWorkerHeartbeat"} <= names


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_exprs())} rules found" in result.stdout


async def test_rules_and_dashboard_use_only_exported_metrics(
    rig: Any, redis_url: str, prefix: str, aiohttp_server: Callable[..., Any]
) -> None:
    fake = FakeOpenAI()
    api_url = str((await aiohttp_server(fake.app())).make_url("/v1"))
    handlers = [sink("ok", redis_url, prefix), sink("broken", redis_url, prefix, fail_times=-1, permanent=True)]
    async with rig(handlers, openai={"api_key": KEY, "base_url": api_url, "timeout_s": 2.0}) as r:
        await r.post(compact(sample("fine_tuning_job.succeeded.json")))
        await eventually(r.settled)
        async with OpenAIClient(r.settings.openai) as api:
            await make_poller(r.settings, r.rclient, api).poll_once()
        _, samples = await scrape(r.client)
    exported = {name for name, _ in samples}
    used = {name for expr in alert_exprs() + dashboard_exprs() for name in _METRIC.findall(expr)}
    assert len(used) >= 10
    assert used <= exported, f"not exported: {sorted(used - exported)}"

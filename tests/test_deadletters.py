"""Dead letters and quarantine, as an operator handles them: list, replay (to one handler), drop."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from processor.runtime import open_runtime
from tests.conftest import ROOT, compact, eventually, sample, signed, sink


def ftjobs(config: Path, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "processor", "-c", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_dead_letter_replay_goes_to_its_handler_only(
    rig: Any, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    broken = sink("flaky", redis_url, prefix, fail_times=-1, max_attempts=2, backoff_s=0.01)
    fine = sink("fine", redis_url, prefix)
    async with rig([broken, fine]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")), "wh_dlq")

        async def dead() -> bool:
            return len(await r.dead("flaky")) == 1

        await eventually(dead)
    config = tmp_path / "ftjobs.toml"
    config.write_text(
        f'[redis]\nprefix = "{prefix}"\n[[handlers]]\nname = "flaky"\ntype = "log"\n'
        '[[handlers]]\nname = "fine"\ntype = "log"\n'
    )
    listed = ftjobs(config, redis_url, "dlq", "list", "flaky")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["ID", "EVENT", "JOB", "ATTEMPTS", "ERROR"]
    assert row.split()[1:4] == ["fine_tuning.job.failed", "ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD", "2"]
    assert "RetryLater: sink flaky fails attempt 2" in listed.stdout
    assert ftjobs(config, redis_url, "dlq", "list", "nope").returncode != 0
    # The handler is fixed (it now succeeds); replay its dead letters.
    async with rig([sink("flaky", redis_url, prefix), fine]) as r:
        replayed = ftjobs(config, redis_url, "dlq", "replay", "flaky", "--all")
        assert replayed.returncode == 0 and "replayed 1 to flaky" in replayed.stdout

        async def delivered() -> bool:
            return len(await r.delivered("flaky")) == 1

        await eventually(delivered)
        await eventually(r.settled)
        [event] = await r.delivered("flaky")
        assert event.target == "flaky" and event.id == "wh_dlq"
        assert event.history and "dead-lettered after 2 attempt(s)" in event.history[0]
        assert len(await r.delivered("fine")) == 1  # the other handler did not get it twice
        assert await r.dead("flaky") == []


async def test_drop(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("a", redis_url, prefix, fail_times=-1, permanent=True)]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def dead() -> bool:
            return len(await r.dead("a")) == 1

        await eventually(dead)
        async with open_runtime(r.settings, redis_url) as runtime:
            letters = runtime.dead_letters
            [letter] = await letters.letters("a")
            assert await letters.drop("a", [letter.id]) == 1
            assert await r.dead("a") == []


async def test_quarantine_replay_after_an_upgrade(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("a", redis_url, prefix)]) as r:
        answer = await r.post(
            b'{"object":"fine_tuning.job","id":"ftjob-q","created_at":"soon","model":"m","status":"x"}'
        )
        assert answer["status"] == "quarantined"
        # A body an older version could not read but this one can (as after an upgrade).
        readable = compact(sample("fine_tuning_job.failed.json"))
        await r.rclient.xadd(
            f"{prefix}:{{q}}:quarantine",
            {
                b"body": readable,
                b"error": b"old decoder",
                b"webhook_id": b"wh_old",
                b"received_at": str(time.time()).encode(),
            },
        )
        async with open_runtime(r.settings, redis_url) as runtime:
            letters = runtime.dead_letters
            items = await letters.quarantined()
            outcomes = dict(await letters.replay_quarantined([i.id for i in items], ["a"]))
            assert sorted(outcomes.values()) == [
                "enqueued as fine_tuning.job.failed for ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD",
                "still not readable: created_at: Expected `int`, got `str`",
            ]

            async def delivered() -> bool:
                return len(await r.delivered("a")) == 1

            await eventually(delivered)
            assert len(await letters.quarantined()) == 1  # the unreadable one stays


async def test_a_sender_cannot_take_the_id_a_quarantine_replay_will_use(rig: Any, redis_url: str, prefix: str) -> None:
    """Replays enqueue under `<webhook-id>:replayed`. A sender who could send that id first would make the
    replay a "duplicate", and the quarantined body would be deleted without ever being delivered."""
    async with rig([sink("a", redis_url, prefix)]) as r:
        # A body an older version could not read but this one can (as after an upgrade).
        await r.rclient.xadd(
            f"{prefix}:{{q}}:quarantine",
            {
                b"body": compact(sample("fine_tuning_job.failed.json")),
                b"error": b"old decoder",
                b"webhook_id": b"wh_old",
                b"received_at": str(time.time()).encode(),
            },
        )
        decoy = compact(sample("fine_tuning_job.succeeded.json"))
        resp = await r.client.post("/webhooks/openai", data=decoy, headers=signed(decoy, "wh_old:replayed"))
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_webhook_id"
        async with open_runtime(r.settings, redis_url) as runtime:
            letters = runtime.dead_letters
            [item] = await letters.quarantined()
            outcomes = dict(await letters.replay_quarantined([item.id], ["a"]))
            assert outcomes == {item.id: "enqueued as fine_tuning.job.failed for ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD"}

            async def delivered() -> bool:
                return len(await r.delivered("a")) == 1

            await eventually(delivered)
            [event] = await r.delivered("a")
            assert event.job_id == "ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD"

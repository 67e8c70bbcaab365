"""Handlers for the benchmark: a no-op (dispatch cost alone) and a probe that records when each event started."""

from __future__ import annotations

import os
import time
from pathlib import Path

from processor.handler import Delivery, NoOptions


class Noop:
    Options = NoOptions

    def __init__(self, name: str, options: NoOptions) -> None:
        self.name = name

    async def __call__(self, delivery: Delivery) -> None:
        return None


class StartProbe:
    """Records `webhook_id start received` at handler start (`received`: when the receiver took the request);
    writes them to `$FTJOBS_BENCH_PROBE` on close."""

    Options = NoOptions

    def __init__(self, name: str, options: NoOptions) -> None:
        self.name = name
        self.starts: list[tuple[str, float, float]] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.starts.append((delivery.event.id, time.time(), delivery.event.received_at))

    async def close(self) -> None:
        lines = "".join(f"{event_id} {at:.6f} {received:.6f}\n" for event_id, at, received in self.starts)
        Path(os.environ["FTJOBS_BENCH_PROBE"]).write_text(lines)  # noqa: ASYNC240 -- once, at shutdown

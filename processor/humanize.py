"""Times, durations and token counts as people read them, for templates, the dashboard and the CLI."""

from __future__ import annotations

from datetime import UTC, datetime


def human_time(ts: int | float | None) -> str:
    """`2025-10-27 10:57 UTC` for a unix timestamp ('' for None)."""
    if not ts:
        return ""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def human_duration(seconds: float | None) -> str:
    """`3h 56m`, `4m 10s`, `12s` ('' for None)."""
    if seconds is None or seconds < 0:
        return ""
    s = int(seconds)
    hours, minutes = divmod(s // 60, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {s % 60:02d}s" if minutes else f"{s}s"


def human_tokens(n: int | None) -> str:
    """`6.28M`, `12.5k`, `980` ('' for None)."""
    if n is None:
        return ""
    for size, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)

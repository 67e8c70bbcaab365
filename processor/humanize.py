"""Times, durations and token counts as people read them, for templates, the dashboard and the CLI; and text
from senders made safe to show on a terminal."""

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


#: C0 controls, DEL, C1 controls, the bidirectional overrides and isolates ("Trojan Source"), and the
#: backslash itself (so a sender's literal `\\x1b` cannot pass for an escaped ESC).
_SHOWN_ESCAPED: dict[int, str] = (
    {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
    | {c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
    | {ord("\\"): "\\\\"}
)


def terminal_safe(text: str) -> str:
    """`text` with every control character shown as an escape (`\\x1b`): a status or an error a sender wrote
    can then neither move the cursor, retitle the window, nor split a table row on an operator's terminal."""
    return text.translate(_SHOWN_ESCAPED)

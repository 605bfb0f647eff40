"""Number formatting shared by the plan's notes, its text / markdown report and docs/scale.md."""

from __future__ import annotations


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.3g} {unit}"
        n /= 1000
    return ""


def fmt_hours(sec: float | None) -> str:
    if sec is None:
        return "n/a"
    h = sec / 3600
    return f"{h:,.3g}" if h < 1000 else f"{h:,.0f}"


def fmt_sig(x: float | None) -> str:
    """Three significant figures, thousands separated (``1,680``, ``0.274``); ``n/a`` for None."""
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"

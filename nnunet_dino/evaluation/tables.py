"""Markdown formatting shared by the benchmark report and its learning-curve section."""
from __future__ import annotations

import math


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals; an en dash for a missing one (None, NaN)."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def p_value(value: float | None) -> str:
    """A p-value: two significant digits, scientific below 0.001, an en dash when there is none."""
    return "–" if value is None or math.isnan(value) else (f"{value:.2g}" if value >= 1e-3 else f"{value:.1e}")


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]

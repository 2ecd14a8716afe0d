"""Plain-text tables for the command line: the package's one formatter."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[str]], rules: Sequence[int] = (1,)) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right.

    ``rules``: a dashed line is drawn above each of these row indices (1: under the header).
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    rule = "-" * len(lines[0])
    for at in sorted(rules, reverse=True):
        lines.insert(at, rule)
    return "\n".join(lines)


def csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows (dicts) as CSV text with ``columns``: a missing or None cell is empty, a
    ``shape`` cell is written as ``AxBxC``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("" if v is None else "x".join(map(str, v)) if c == "shape" else v)
        w.writerow(cells)
    return buf.getvalue()

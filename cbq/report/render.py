"""Free-form tables of runs (``--rows`` x ``--cols``, ``--runs``) and their text forms."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

from cbq.report.runs import Record, bits_order, lookup, metric_value, setting, variant_label
from cbq.results import Status

MISSING = "-"
FAILED = "failed"


def format_value(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "✓" if value else "✗"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def pivot(
    records: Iterable[Record], rows: Sequence[str], cols: str, metric: str
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a table; later runs of the same cell replace earlier ones."""
    cells: dict[tuple[str, ...], dict[str, Any]] = {}
    columns: dict[str, Record] = {}  # each column's first run
    for record in records:
        if record.status is not Status.finished:
            continue
        key = tuple(row_value(record, r) for r in rows)
        column = str(lookup(record, cols))
        columns.setdefault(column, record)
        value = metric_value(record, metric)
        cell = cells.setdefault(key, {})
        if value is not None or column not in cell:  # a run without the metric erases nothing
            cell[column] = value
    order = list(columns)
    if cols == "setting":  # fp, weight-only, then weights and activations, most bits first
        order.sort(key=lambda c: (c != "fp", bits_order(columns[c])))
    header = [r.split(".")[0] for r in rows] + order
    body = [
        list(key) + [format_value(values.get(c)) for c in order] for key, values in cells.items()
    ]
    if rows and rows[0] in ("method.name", VARIANT):
        body.sort(key=lambda row: _method_rank(row[0].split(" ")[0]))
    return header, body


# Row key naming the method and, for CBQ, its non-default components (variant_label).
VARIANT = "variant"


def row_value(record: Record, key: str) -> str:
    return variant_label(record) if key == VARIANT else str(lookup(record, key))


# Rows keyed by method go in this order; other methods follow in the order they appeared.
METHOD_ORDER: tuple[str, ...] = (
    "fp", "rtn", "gptq", "awq", "smoothquant", "osplus", "omniquant", "autoround", "cbq",
)  # fmt: skip


def _method_rank(name: str) -> int:
    return METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER)


def mark_best(body: list[list[str]], keys: int, best: str) -> list[list[str]]:
    """``body`` with the lowest (``best="min"``) or highest (``"max"``) number of each value
    column in bold, Markdown style; columns with fewer than two numbers are left alone."""
    marked = [list(row) for row in body]
    for column in range(keys, len(body[0]) if body else 0):
        numbers = {i: _number(row[column]) for i, row in enumerate(body)}
        numbers = {i: v for i, v in numbers.items() if v is not None}
        if len(numbers) < 2:
            continue
        pick = min if best == "min" else max
        winner = pick(numbers.values())
        for i, value in numbers.items():
            if value == winner:
                marked[i][column] = f"**{body[i][column]}**"
    return marked


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def run_summary(records: Iterable[Record]) -> tuple[list[str], list[list[str]]]:
    """One row per run: model, setting, variant, status, every perplexity, the seconds of
    every phase and the peak RSS (the table ``make run`` ends with). Skipped jobs are left out."""
    records = [r for r in records if r.status is not Status.skipped]
    metrics = sorted({k for r in records for k in r.metrics if k.startswith("ppl/")})
    phases = list(dict.fromkeys(k for r in records for k in r.timing_s))
    phases.sort(key=lambda phase: phase == "total")  # the run's whole time last
    header = ["model", "setting", "variant", "status", *metrics]
    header += [f"{phase} (s)" for phase in phases] + ["peak RSS (MiB)"]
    body = []
    for record in sorted(records, key=lambda r: (str(lookup(r, "model.name")), bits_order(r))):
        row = [str(lookup(record, "model.name")), str(setting(record)), variant_label(record)]
        row.append(record.status.value)
        row += [format_value(record.metrics.get(m)) for m in metrics]
        row += [format_value(record.timing_s.get(phase)) for phase in phases]
        body.append([*row, format_value(lookup(record, "memory.peak_rss_mib"))])
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def csv_text(header: list[str], body: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(body)
    return buffer.getvalue()

"""Turn the ``results.json`` files of a sweep into tables (Markdown or CSV).

    python -m cbq.report multirun/2026-11-24_10-00-00 --metric ppl/wiki-sample
    python -m cbq.report multirun/... --rows model.name method.name --cols quant.name --csv

Reads local files only. A cell with no finished run shows as ``-``, never as a number.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cbq.results import RESULTS_FILE

MISSING = "-"


def load_results(root: Path) -> list[dict[str, Any]]:
    """Every results.json under ``root`` (a run dir or a sweep dir), oldest first."""
    paths = sorted(root.rglob(RESULTS_FILE), key=lambda p: p.stat().st_mtime)
    records = []
    for path in paths:
        record = json.loads(path.read_text())
        record["_path"] = str(path.parent)
        records.append(record)
    return records


def setting(record: dict[str, Any]) -> str | None:
    """The column a run belongs to in a results table: ``fp``, or the quant preset."""
    config = record.get("config", {})
    if config.get("method", {}).get("name") == "fp":
        return "fp"
    return config.get("quant", {}).get("name")


def lookup(record: dict[str, Any], dotted: str) -> Any:
    """``quant.name`` style lookups in the config, then in the record; ``setting`` is
    derived (see :func:`setting`)."""
    if dotted == "setting":
        return setting(record)
    for root in (record.get("config", {}), record):
        node: Any = root
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return None


def format_value(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def pivot(
    records: Iterable[dict[str, Any]], rows: Sequence[str], cols: str, metric: str
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a table; later runs of the same cell replace earlier ones."""
    cells: dict[tuple[str, ...], dict[str, Any]] = {}
    columns: list[str] = []
    for record in records:
        if record.get("status") != "finished":
            continue
        key = tuple(str(lookup(record, r)) for r in rows)
        column = str(lookup(record, cols))
        if column not in columns:
            columns.append(column)
        cells.setdefault(key, {})[column] = record.get("metrics", {}).get(metric)
    header = [r.split(".")[0] for r in rows] + columns
    body = [
        list(key) + [format_value(values.get(c)) for c in columns] for key, values in cells.items()
    ]
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tables from a sweep's results.json files")
    parser.add_argument("root", type=Path)
    parser.add_argument("--metric", default="ppl/wiki-sample")
    parser.add_argument("--rows", nargs="+", default=["model.name"])
    parser.add_argument("--cols", default="setting", help="fp, or the quant preset")
    parser.add_argument("--csv", action="store_true", help="CSV instead of Markdown")
    args = parser.parse_args(argv)
    records = load_results(args.root)
    if not records:
        raise SystemExit(f"no {RESULTS_FILE} under {args.root}")
    header, body = pivot(records, args.rows, args.cols, args.metric)
    print(csv_text(header, body) if args.csv else markdown(header, body))


if __name__ == "__main__":
    main()

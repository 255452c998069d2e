"""``python -m cbq.report``: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cbq.report.render import csv_text, mark_best, markdown, pivot, run_summary
from cbq.report.runs import load_many, matching
from cbq.report.tables import LAYOUTS, build_table, table_csv, table_markdown
from cbq.results import RESULTS_FILE

# --- command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tables from sweeps' results.json files")
    parser.add_argument("roots", type=Path, nargs="+", help="run or sweep dirs")
    parser.add_argument("--table", type=int, choices=sorted(LAYOUTS), help="a paper table")
    parser.add_argument(
        "--metric",
        default="ppl/wiki-sample",
        help="a metrics key, or a dotted path such as timing_s.quantize or memory.peak_rss_mib",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["model.name"],
        help="dotted config paths, or 'variant': the method and CBQ's non-default components",
    )
    parser.add_argument("--cols", default="setting", help="fp, or the quant preset")
    parser.add_argument(
        "--where",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="keep only these runs, e.g. model.name=gemma3-270m setting=w4a16,w4a4; "
        "repeating --where adds conditions",
    )
    parser.add_argument(
        "--best",
        choices=("min", "max"),
        help="bold the lowest / highest value of each column (Markdown tables)",
    )
    parser.add_argument(
        "--runs",
        action="store_true",
        help="one row per run: perplexities, seconds per phase, peak memory",
    )
    parser.add_argument("--csv", action="store_true", help="CSV instead of Markdown")
    parser.add_argument("--plots", type=Path, help="write PNG plots into this dir")
    args = parser.parse_args(argv)
    try:
        records = matching(load_many(args.roots), args.where)
    except ValueError as error:
        parser.error(str(error))
    if not records:
        where = f" matching {' '.join(args.where)}" if args.where else ""
        raise SystemExit(f"no {RESULTS_FILE}{where} under {', '.join(map(str, args.roots))}")
    if args.runs:
        header, body = run_summary(records)
        print(csv_text(header, body) if args.csv else markdown(header, body))
    elif args.table is not None:
        table = build_table(records, args.table)
        print(table_csv(table).rstrip("\n") if args.csv else table_markdown(table))
    else:
        header, body = pivot(records, args.rows, args.cols, args.metric)
        if args.csv:
            print(csv_text(header, body))
        else:
            best = mark_best(body, len(args.rows), args.best) if args.best else body
            print(markdown(header, best))
    if args.plots is not None:
        from cbq.report.plots import write_plots  # matplotlib only when asked for

        for path in write_plots(records, args.plots):
            print(f"wrote {path}", file=sys.stderr)

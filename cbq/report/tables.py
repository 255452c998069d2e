"""The paper's Tables 1-7: which cell each run fills, in the paper's row and column order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cbq.report.render import FAILED, csv_text, format_value, markdown
from cbq.report.runs import (
    Record,
    at_reference,
    cfp_label,
    is_cbq,
    label_rank,
    lookup,
    method_label,
    method_name,
    model_setting,
    optimizer_steps,
    peak_memory,
    ppl,
    ppl_corpora,
    quantize_seconds,
    rounding_label,
    rounding_params,
    setting,
    zeroshot_info,
    zeroshot_metric,
)
from cbq.results import Status

# A table column: (group, name). In Markdown, each group (e.g. the model and setting of an
# ablation) is a table of its own, titled with the group.
Column = tuple[str, str]

# --- table layouts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One cell a run fills: its row key (raw values), its column and its value."""

    row: tuple[Any, ...]
    column: Column
    value: Any


@dataclass(frozen=True)
class Layout:
    """A paper table: row-key labels, the cells each run fills, and how to order them.

    ``ablates`` names the CBQ components the table varies (the others are held at their
    reference). ``row_order``: ``grouped`` ranks each row-key component by where its value
    first appeared (rows grouped by the first component, then the second, ...; ``fp``
    first), ``value`` sorts by the values, ``paper`` by ``paper_rank`` (the paper's row
    order). ``column_rank`` puts groups of columns first (lower first)."""

    title: str
    rows: tuple[str, ...]
    entries: Callable[[Record], Iterator[Entry]]
    ablates: tuple[str, ...] = ()
    cbq_only: bool = False
    row_order: Literal["grouped", "value", "paper"] = "grouped"
    # With row_order="paper": the sort key that puts rows in the paper's order.
    paper_rank: Callable[[tuple[Any, ...]], Any] = lambda key: 0
    column_rank: Callable[[Column], int] = lambda column: 0
    footer: Callable[[list[Record]], list[str]] = lambda records: []


@dataclass
class Table:
    title: str
    row_labels: tuple[str, ...]
    columns: list[Column]
    rows: list[tuple[tuple[Any, ...], list[Any]]] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)


def ppl_entries(record: Record, row: tuple[Any, ...], group: str) -> Iterator[Entry]:
    for corpus in ppl_corpora(record):
        yield Entry(row, (group, corpus), ppl(record, corpus))


def table1_entries(record: Record) -> Iterator[Entry]:
    row = (lookup(record, "model.name"), setting(record), method_name(record))
    for key, value in record.metrics.items():
        parsed = zeroshot_metric(key)
        if parsed is not None:
            yield Entry(row, ("", " ".join(parsed)), None if value is None else 100 * value)
    for corpus in ppl_corpora(record):
        yield Entry(row, ("", f"ppl {corpus}"), ppl(record, corpus))


def table1_footer(records: list[Record]) -> list[str]:
    """Examples and chance level per task, as the latest run recorded them."""
    info: dict[str, dict[str, Any]] = {}
    for record in records:
        for task, fields in zeroshot_info(record).items():
            info.setdefault(task, {}).update(fields)
    notes = [note for task, fields in info.items() if (note := task_note(task, fields))]
    return [f"Zero-shot examples: {'; '.join(notes)}"] if notes else []


def task_note(task: str, fields: dict[str, Any]) -> str:
    """``cbq_hellaswag_wiki: 200 examples, chance 25.0%``; standard errors, which vary
    from run to run, are left out."""
    parts = []
    for name, value in fields.items():
        if "stderr" in name:
            continue
        if name in ("n", "n_examples"):
            parts.append(f"{value} examples")
        elif name.startswith("chance"):
            chance = f"{100 * value:.1f}%" if isinstance(value, float) else str(value)
            parts.append(f"chance {chance}")
        else:
            parts.append(f"{name} {format_value(value)}")
    return f"{task}: {', '.join(parts)}" if parts else ""


def table2_entries(record: Record) -> Iterator[Entry]:
    for corpus in ppl_corpora(record):
        row = (corpus, setting(record), method_name(record))
        yield Entry(row, ("", str(lookup(record, "model.name"))), ppl(record, corpus))


def table3_entries(record: Record) -> Iterator[Entry]:
    for corpus in ppl_corpora(record):
        row = (corpus, lookup(record, "model.name"), setting(record))
        yield Entry(row, ("", method_label(record)), ppl(record, corpus))


def table4_entries(record: Record) -> Iterator[Entry]:
    row = (lookup(record, "window.size"), lookup(record, "window.overlap"))
    yield from _cost_entries(record, row, memory=True)


def table5_entries(record: Record) -> Iterator[Entry]:
    kind = lookup(record, "loss.kind")
    homologous = bool(lookup(record, "loss.homologous"))
    row = ("kl" in str(kind), "l2" in str(kind), homologous)
    yield from _cost_entries(record, row, memory=False)


def _cost_entries(record: Record, row: tuple[Any, ...], memory: bool) -> Iterator[Entry]:
    group = model_setting(record)
    yield from ppl_entries(record, row, group)
    yield Entry(row, (group, "quantize (s)"), quantize_seconds(record))
    if memory:
        name, mib = peak_memory(record)
        yield Entry(row, (group, name), mib)


def table6_entries(record: Record) -> Iterator[Entry]:
    row = (rounding_label(record), setting(record))
    group = str(lookup(record, "model.name"))
    yield from ppl_entries(record, row, group)
    yield Entry(row, (group, "#iters"), optimizer_steps(record))
    yield Entry(row, (group, "rounding params/block"), rounding_params(record))
    yield Entry(row, (group, "weights moved (%)"), moved_percent(record))
    name, mib = peak_memory(record)
    yield Entry(row, (group, name), mib)
    yield Entry(row, (group, "quantize (s)"), quantize_seconds(record))


def table7_entries(record: Record) -> Iterator[Entry]:
    row = (cfp_label(record), setting(record))
    group = str(lookup(record, "model.name"))
    yield from ppl_entries(record, row, group)
    yield Entry(row, (group, "truncated weights"), truncated_weights(record))


def moved_percent(record: Record) -> float | None:
    """Percent of the quantized weights whose learned rounding differs from RTN (committed
    blocks, ``stats.rounding_moved``); 0 for ``rounding=nearest``; None for older records."""
    if lookup(record, "rounding.kind") == "nearest":
        return 0.0
    counts = record.stats.get("rounding_moved")
    if not counts:
        return None
    moved, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    return round(100 * moved / total, 2)


def truncated_weights(record: Record) -> int | None:
    """Weights CFP truncated in the whole model (``stats.cfp``)."""
    cfp = record.stats.get("cfp")
    if not isinstance(cfp, dict):
        return None
    return sum(sum(block.get("weight", {}).values()) for block in cfp.values())


LAYOUTS: dict[int, Layout] = {
    1: Layout(
        "Table 1: zero-shot accuracy (%) and perplexity",
        ("model", "setting", "method"),
        table1_entries,
        column_rank=lambda column: int(column[1].startswith("ppl ")),
        footer=table1_footer,
    ),
    2: Layout(
        "Table 2: perplexity per corpus, setting and method",
        ("corpus", "setting", "method"),
        table2_entries,
    ),
    3: Layout(
        "Table 3: perplexity, one block at a time against cross-block windows",
        ("corpus", "model", "setting"),
        table3_entries,
        ablates=("window",),
    ),
    4: Layout(
        "Table 4: CBQ blocks per window and overlap (perplexity, quantize time, peak memory)",
        ("#blocks", "overlap"),
        table4_entries,
        ablates=("window",),
        cbq_only=True,
        row_order="value",
    ),
    5: Layout(
        "Table 5: CBQ reconstruction loss (perplexity, quantize time)",
        ("KL", "L2", "homologous"),
        table5_entries,
        ablates=("loss",),
        cbq_only=True,
        row_order="paper",
        # L2, KL, L2+KL, then with homologous targets; rows are (KL, L2, homologous).
        paper_rank=lambda key: (key[2], key[0] and key[1], key[0]),
    ),
    6: Layout(
        "Table 6: CBQ rounding (perplexity, optimizer steps, rounding variables, memory, time)",
        ("rounding", "setting"),
        table6_entries,
        ablates=("rounding",),
        cbq_only=True,
        row_order="paper",
        paper_rank=label_rank(("nearest", "adaround", "lora")),
        footer=lambda records: [
            "#iters: optimizer steps of the whole run (all windows); rounding params/block: "
            "learnable rounding variables of one block (0: round to nearest); weights moved: "
            "share of the quantized weights whose rounding differs from RTN at the learned "
            "step sizes."
        ],
    ),
    7: Layout(
        "Table 7: CBQ coarse-to-fine pre-processing (perplexity)",
        ("cfp", "setting"),
        table7_entries,
        ablates=("cfp",),
        cbq_only=True,
        row_order="paper",
        paper_rank=label_rank(("none", "weight", "weight_act")),
    ),
}


def table_records(records: Sequence[Record], number: int) -> list[Record]:
    """The runs that make cells of table ``number``."""
    layout = LAYOUTS[number]
    runs = [r for r in records if r.status in (Status.finished, Status.failed)]
    if layout.cbq_only:
        runs = [r for r in runs if is_cbq(r)]
    return at_reference(runs, layout.ablates, number)


def build_table(records: Sequence[Record], number: int) -> Table:
    """Table ``number`` in the paper's layout from runs given oldest first."""
    layout = LAYOUTS[number]
    runs = table_records(records, number)
    cells: dict[tuple[Any, ...], dict[Column, Any]] = {}
    columns: list[Column] = []
    for record in runs:
        failed = record.status is Status.failed
        for entry in layout.entries(record):
            if entry.column not in columns:
                columns.append(entry.column)
            cell = cells.setdefault(entry.row, {})
            if failed:
                if cell.get(entry.column) is None:
                    cell[entry.column] = FAILED
            elif entry.value is not None:
                cell[entry.column] = entry.value
            else:
                cell.setdefault(entry.column, None)
    columns.sort(key=layout.column_rank)  # stable: first appearance within a rank
    keys = order_rows(list(cells), layout.row_order, layout.paper_rank)
    rows = [(key, [cells[key].get(c) for c in columns]) for key in keys]
    return Table(layout.title, layout.rows, columns, rows, layout.footer(runs))


def _natural_key(key: tuple[Any, ...]) -> tuple[tuple[int, Any], ...]:
    return tuple((0, part) if isinstance(part, int | float) else (1, str(part)) for part in key)


def order_rows(
    keys: list[tuple[Any, ...]], order: str, paper_rank: Callable[[tuple[Any, ...]], Any]
) -> list[tuple[Any, ...]]:
    """Row keys, given in order of first appearance, in the layout's order."""
    if order == "paper":
        return sorted(keys, key=paper_rank)
    if order == "value":
        return sorted(keys, key=_natural_key)
    return _grouped(keys)


def _grouped(keys: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows grouped by their first component, then the second, ...: each value ranked by
    where it first appeared; ``fp`` (the reference of every table) first."""
    ranks: list[dict[Any, int]] = [{} for _ in keys[0]] if keys else []
    for key in keys:
        for rank, part in zip(ranks, key, strict=True):
            rank.setdefault(part, len(rank))
    return sorted(
        keys, key=lambda k: tuple((part != "fp", r[part]) for r, part in zip(ranks, k, strict=True))
    )


# --- rendering ---------------------------------------------------------------------------


def by_group(table: Table) -> list[Table]:
    """The table split by column group (``model (setting)`` of the ablations), a part per
    group, titled with it and holding the rows with a cell in that group; a table without
    groups as it is."""
    groups = list(dict.fromkeys(group for group, _ in table.columns))
    if groups in ([], [""]):
        return [table]
    parts = []
    for group in groups:
        keep = [i for i, (g, _) in enumerate(table.columns) if g in (group, "")]
        rows = [(key, [values[i] for i in keep]) for key, values in table.rows]
        rows = [(key, values) for key, values in rows if any(v is not None for v in values)]
        title = f"{table.title} — {group}" if group else table.title
        columns = [table.columns[i] for i in keep]
        parts.append(Table(title, table.row_labels, columns, rows))
    return parts


def _cells(key: tuple[Any, ...], values: list[Any]) -> list[str]:
    return [format_value(part) for part in key] + [format_value(v) for v in values]


def table_markdown(table: Table) -> str:
    """Title and table per column group (a repeated leading row label left blank, as in
    the paper), then the footer lines."""
    if not table.rows:
        return f"{table.title}\n\n(no finished or failed runs for this table)"
    parts = []
    for part in by_group(table):
        header = list(part.row_labels) + [name for _, name in part.columns]
        body, previous = [], None
        for key, values in part.rows:
            row = _cells(key, values)
            if previous is not None:
                row[: len(key)] = _blank_repeats(key, previous)
            body.append(row)
            previous = key
        parts += [part.title, markdown(header, body)]
    return "\n\n".join(parts + table.footer)


def _blank_repeats(key: tuple[Any, ...], previous: tuple[Any, ...]) -> list[str]:
    """The row labels, blank while they repeat the previous row's from the left."""
    labels, same = [], True
    for part, before in zip(key, previous, strict=True):
        same = same and part == before
        labels.append("" if same else format_value(part))
    return labels


def table_csv(table: Table) -> str:
    """One wide table: a column per (group, name), labelled ``group name``."""
    header = list(table.row_labels) + [f"{g} {n}".strip() for g, n in table.columns]
    return csv_text(header, [_cells(key, values) for key, values in table.rows])

"""Turn the ``results.json`` files of sweeps into tables (Markdown or CSV) and plots.

    python -m cbq.report multirun/2026-11-24_10-00-00 --metric ppl/wiki-sample
    python -m cbq.report multirun/... --rows model.name method.name --cols quant.name --csv
    python -m cbq.report multirun/table5_loss/cpu multirun/table4_window/cpu --table 5
    python -m cbq.report multirun/cbq_smollm2 --table 2 --plots plots/

``--table N`` lays the runs out as the paper's Table N (see :data:`LAYOUTS`). The rules:

- Only finished and failed runs make cells; skipped and still running ones do not.
- Later runs of an identical cell replace earlier ones (runs are read oldest first, across
  every root given).
- A cell with no run shows as ``-``, never as a number. A cell whose only runs failed shows
  as ``failed``; a failed run never replaces a finished one's number.
- An ablation table varies one CBQ component (window, loss, CFP or rounding); its CBQ runs
  must hold the other components at the table's reference, so that a run of another sweep
  (Table 4's windows, say) lands only in the row it shares (Table 5's default row). The
  reference of a component is its default (``cbq.config``) when a run of the table's own
  sweep uses the default, else the value most of the table's own runs use.
- Accuracies are percentages (lm-eval reports fractions).

Reads local files only.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from cbq.config import CFPConfig, LossConfig, RoundingConfig, WindowConfig
from cbq.methods import METHODS
from cbq.results import RESULTS_FILE, written_at

MISSING = "-"
FAILED = "failed"
Record = dict[str, Any]
# A table column: (group, name). In Markdown, each group (e.g. the model and setting of an
# ablation) is a table of its own, titled with the group.
Column = tuple[str, str]


def load_results(root: Path) -> list[Record]:
    """Every results.json under ``root`` (a run dir or a sweep dir), oldest first."""
    records = []
    for path in root.rglob(RESULTS_FILE):
        record = json.loads(path.read_text())
        record["_path"] = str(path.parent)
        record["_written_at"] = written_at(path, record)
        records.append(record)
    return sorted(records, key=lambda record: record["_written_at"])


def load_many(roots: Iterable[Path]) -> list[Record]:
    """The runs under several roots, oldest first across all of them; a run under two of
    the roots (nested roots) counts once."""
    seen: dict[str, tuple[float, Record]] = {}
    for root in roots:
        for record in load_results(root):
            path = Path(record["_path"]).resolve()
            seen[str(path)] = (record["_written_at"], record)
    return [record for _, record in sorted(seen.values(), key=lambda item: item[0])]


def setting(record: Record) -> str | None:
    """The column a run belongs to in a results table: ``fp``, or the quant preset."""
    config = record.get("config", {})
    if config.get("method", {}).get("name") == "fp":
        return "fp"
    return config.get("quant", {}).get("name")


def bits_order(record: Record) -> tuple[bool, float, float, float]:
    """Sort key of a setting: weight-only settings before those that also quantize the
    activations; within each, weight bits, activation bits, then the weight group size
    (per channel, then larger groups), most precise first."""
    a_bits = lookup(record, "quant.a_bits") or 16
    group = lookup(record, "quant.w_group_size")
    return (a_bits < 16, -(lookup(record, "quant.w_bits") or 0), -a_bits, -(group or math.inf))


def lookup(record: Record, dotted: str) -> Any:
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
    if isinstance(value, bool):
        return "✓" if value else "✗"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def matching(records: Iterable[Record], conditions: Sequence[str]) -> list[Record]:
    """The runs for which every ``key=value`` condition holds (``model.name=smollm2-135m``,
    ``setting=w4a16``); a value may list alternatives: ``method.name=rtn,cbq``."""
    parsed = []
    for condition in conditions:
        key, sep, values = condition.partition("=")
        if not sep or not key:
            raise ValueError(f"--where takes KEY=VALUE[,VALUE...], got {condition!r}")
        parsed.append((key, set(values.split(","))))
    return [r for r in records if all(str(lookup(r, k)) in allowed for k, allowed in parsed)]


def metric_value(record: Record, metric: str) -> Any:
    """A key of the run's metrics (``ppl/wiki-sample``), else a dotted path into the record
    (``timing_s.quantize``, ``memory.peak_rss_mib``)."""
    value = record.get("metrics", {}).get(metric)
    return lookup(record, metric) if value is None and "." in metric else value


def pivot(
    records: Iterable[Record], rows: Sequence[str], cols: str, metric: str
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a table; later runs of the same cell replace earlier ones."""
    cells: dict[tuple[str, ...], dict[str, Any]] = {}
    columns: dict[str, Record] = {}  # each column's first run
    for record in records:
        if record.get("status") != "finished":
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
    records = [r for r in records if r.get("status") != "skipped"]
    metrics = sorted({k for r in records for k in r.get("metrics", {}) if k.startswith("ppl/")})
    phases = list(dict.fromkeys(k for r in records for k in r.get("timing_s", {})))
    phases.sort(key=lambda phase: phase == "total")  # the run's whole time last
    header = ["model", "setting", "variant", "status", *metrics]
    header += [f"{phase} (s)" for phase in phases] + ["peak RSS (MiB)"]
    body = []
    for record in sorted(records, key=lambda r: (str(lookup(r, "model.name")), bits_order(r))):
        row = [str(lookup(record, "model.name")), str(setting(record)), variant_label(record)]
        row.append(str(record.get("status")))
        row += [format_value(record.get("metrics", {}).get(m)) for m in metrics]
        row += [format_value(record.get("timing_s", {}).get(phase)) for phase in phases]
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


# --- what a run measured -----------------------------------------------------------------


def method_name(record: Record) -> str | None:
    return lookup(record, "method.name")


def is_cbq(record: Record) -> bool:
    return method_name(record) == "cbq"


def model_setting(record: Record) -> str:
    """``smollm2-135m (w8a8)``: the column group of the ablation tables."""
    return f"{lookup(record, 'model.name')} ({lookup(record, 'quant.name')})"


def ppl_corpora(record: Record) -> list[str]:
    """The corpora a run measured perplexity on, or was configured to (a failed run)."""
    corpora = [key.split("/", 1)[1] for key in record.get("metrics", {}) if key.startswith("ppl/")]
    configured = lookup(record, "data.eval") or []
    for corpus in [configured] if isinstance(configured, str) else configured:
        if corpus not in corpora:
            corpora.append(corpus)
    return corpora


def ppl(record: Record, corpus: str) -> float | None:
    return record.get("metrics", {}).get(f"ppl/{corpus}")


def zeroshot_metric(key: str) -> tuple[str, str] | None:
    """``zeroshot/<task>/<metric>`` -> (task, metric) for the accuracies of a task, else
    None (stderr, a task's perplexity). lm-eval's ``acc,none`` filter suffix is dropped."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "zeroshot":
        return None
    metric = parts[2].split(",")[0]
    if not metric.startswith("acc") or "stderr" in metric:
        return None
    return parts[1], metric


def zeroshot_info(record: Record) -> dict[str, dict[str, Any]]:
    """Per task, what the run recorded about its examples (count, chance) in ``stats``,
    either as ``zeroshot/<task>/<field>`` keys or as ``stats["zeroshot"][task]``."""
    stats = record.get("stats") or {}
    info: dict[str, dict[str, Any]] = {}
    nested = stats.get("zeroshot")
    if isinstance(nested, dict):
        for task, fields in nested.items():
            if isinstance(fields, dict):
                info.setdefault(task, {}).update(
                    {k: v for k, v in fields.items() if not isinstance(v, dict | list)}
                )
    for key, value in stats.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "zeroshot":
            info.setdefault(parts[1], {})[parts[2]] = value
    return info


def quantize_seconds(record: Record) -> int | None:
    seconds = (record.get("timing_s") or {}).get("quantize")
    return None if seconds is None else round(seconds)


def peak_memory(record: Record) -> tuple[str, int | None]:
    """(column name, MiB): the accelerator's peak where one was used, else the peak RSS."""
    memory = record.get("memory") or {}
    if memory.get("peak_cuda_mib") is not None:
        return "peak CUDA (MiB)", round(memory["peak_cuda_mib"])
    rss = memory.get("peak_rss_mib")
    return "peak RSS (MiB)", None if rss is None else round(rss)


def optimizer_steps(record: Record) -> int | None:
    """Optimizer steps of the whole run: as recorded, else windows x epochs x batches."""
    stats = record.get("stats") or {}
    for key in ("optimizer_steps", "steps"):
        if isinstance(stats.get(key), int):
            return stats[key]
    windows = stats.get("windows")
    if not windows:
        return None
    if all("steps" in window for window in windows):
        return sum(window["steps"] for window in windows)
    epochs, samples = lookup(record, "method.epochs"), lookup(record, "data.n_samples")
    batch = lookup(record, "method.batch_size")
    if None in (epochs, samples, batch):
        return None
    return len(windows) * epochs * math.ceil(samples / batch)


def rounding_params(record: Record) -> int | None:
    """Learnable rounding variables per block of the run's own rounding kind; CBQ records
    the counts of both kinds (``{"adaround": n, "lora_r5": m}``)."""
    kind = lookup(record, "rounding.kind")
    if kind == "nearest":
        return 0
    counts = (record.get("stats") or {}).get("rounding_params_per_block")
    if not isinstance(counts, dict):
        return counts
    key = "adaround" if kind == "adaround" else f"lora_r{lookup(record, 'rounding.rank')}"
    return counts.get(key)


def window_label(record: Record) -> str:
    """``K=2 ov1``: blocks per window and blocks shared with the next window."""
    size, overlap = lookup(record, "window.size"), lookup(record, "window.overlap")
    return f"K={size}" + (f" ov{overlap}" if overlap else "")


def method_label(record: Record) -> str:
    """The method, and for CBQ its window (Table 3 compares one block at a time to CBD)."""
    name = str(method_name(record))
    return f"{name} {window_label(record)}" if name == "cbq" else name


def label_rank(labels: Sequence[str]) -> Callable[[tuple[Any, ...]], int]:
    """Rows by the first word of their first component, in the order of ``labels``
    (unknown ones last); ties keep the order the rows first appeared in."""

    def rank(key: tuple[Any, ...]) -> int:
        first_word = str(key[0]).split(" ")[0]
        return labels.index(first_word) if first_word in labels else len(labels)

    return rank


def rounding_label(record: Record) -> str:
    """The rounding kind, and ", sigmoid" for the paper's form (offset is the default)."""
    kind = lookup(record, "rounding.kind")
    if kind == "nearest":
        return "nearest (no rounding learning)"
    label = f"lora r={lookup(record, 'rounding.rank')}" if kind == "lora" else None
    label = label or {"adaround": "adaround (full rank)"}.get(kind, str(kind))
    return label + (", sigmoid" if lookup(record, "rounding.form") == "sigmoid" else "")


def loss_label(record: Record) -> str:
    label = str(lookup(record, "loss.kind"))
    label += " +hom" if lookup(record, "loss.homologous") else ""
    return label + (" (relative l2)" if lookup(record, "loss.l2_relative") else "")


def cfp_label(record: Record) -> str:
    """The CFP mode, and the split's variant where it is not the paper's."""
    label, distance = str(lookup(record, "cfp.mode")), lookup(record, "cfp.distance")
    variant = [] if distance in (None, "mean") else [str(distance)]
    variant += ["log"] if lookup(record, "cfp.log_space") else []
    variant += ["migrate"] if lookup(record, "cfp.act_rule") == "migrate" else []
    variant += ["per group"] if lookup(record, "cfp.weight_scope") == "group" else []
    variant += ["to reserved"] if lookup(record, "cfp.clip_to") == "reserved" else []
    return label + (f" ({', '.join(variant)})" if variant else "")


# --- reference values of the CBQ components ------------------------------------------------

# The fields that tell two settings of a component apart (not its hyper-parameters).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "window": ("size", "overlap"),
    "loss": ("kind", "homologous", "l2_relative"),
    "cfp": ("mode", "distance", "log_space", "act_rule", "weight_scope", "clip_to"),
    "rounding": ("kind", "rank", "form"),
}
_DEFAULTS = {
    "window": WindowConfig(),
    "loss": LossConfig(),
    "cfp": CFPConfig(),
    "rounding": RoundingConfig(),
}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def default_component(name: str) -> tuple[Any, ...]:
    return tuple(_plain(getattr(_DEFAULTS[name], part)) for part in COMPONENTS[name])


def component(record: Record, name: str) -> tuple[Any, ...]:
    """A run's setting of a component; a field the run does not record (an older run) at
    its default."""
    values = (lookup(record, f"{name}.{part}") for part in COMPONENTS[name])
    return tuple(
        default if value is None else value
        for value, default in zip(values, default_component(name), strict=True)
    )


COMPONENT_LABELS: dict[str, Callable[[Record], str]] = {
    "window": window_label,
    "loss": loss_label,
    "cfp": cfp_label,
    "rounding": rounding_label,
}


# Method fields that change how a run goes, not its result.
RESULT_NEUTRAL_FIELDS = {"name", "resume", "cache", "forward_batch"}


def method_changes(record: Record) -> list[str]:
    """The method's fields that differ from its config defaults: ``act_order=True``."""
    raw = lookup(record, "method") or {}
    config_class = getattr(METHODS.get(raw.get("name")), "config_class", None)
    if config_class is None:  # not one of ours (the auto-round library's records)
        return []
    defaults = dataclasses.asdict(config_class())
    return [
        f"{key}={value}"
        for key, value in raw.items()
        if key in defaults and key not in RESULT_NEUTRAL_FIELDS and _plain(defaults[key]) != value
    ]


def variant_label(record: Record) -> str:
    """The method with its fields that differ from their defaults, and for CBQ the
    components that differ from the paper's: ``gptq (act_order=True)``, ``cbq (cfp:
    weight_act (migrate))``; ``[eval bf16]`` after a run scored under bf16 autocast. The
    ``--rows variant`` key."""
    name = str(method_name(record))
    changed = method_changes(record)
    if is_cbq(record):
        changed = [
            f"{part}: {COMPONENT_LABELS[part](record)}"
            for part in COMPONENTS
            if component(record, part) != default_component(part)
        ] + changed
    name = f"{name} ({'; '.join(changed)})" if changed else name
    return f"{name} [eval bf16]" if lookup(record, "eval.dtype") == "bfloat16" else name


def references(records: Sequence[Record], table: int | None) -> dict[str, tuple[Any, ...]]:
    """Each component's reference (see the module doc): ``table`` None takes every CBQ run
    as the table's own."""
    own = [
        r
        for r in records
        if is_cbq(r) and (table is None or lookup(r, "experiment.table") == table)
    ]
    chosen = {}
    for name in COMPONENTS:
        values = [component(r, name) for r in own]
        default = default_component(name)
        chosen[name] = default if default in values or not values else _most_common(values)
    return chosen


def _most_common(values: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    return Counter(values).most_common(1)[0][0]


def at_reference(
    records: Sequence[Record], ablates: Sequence[str] = (), table: int | None = None
) -> list[Record]:
    """The runs to show: non-CBQ runs, and CBQ runs whose components other than ``ablates``
    are at their reference."""
    chosen = references(records, table)
    fixed = [name for name in COMPONENTS if name not in ablates]
    return [r for r in records if not is_cbq(r) or all(component(r, n) == chosen[n] for n in fixed)]


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
    for key, value in record.get("metrics", {}).items():
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
    counts = (record.get("stats") or {}).get("rounding_moved")
    if not counts:
        return None
    moved, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    return round(100 * moved / total, 2)


def truncated_weights(record: Record) -> int | None:
    """Weights CFP truncated in the whole model (``stats.cfp``)."""
    cfp = (record.get("stats") or {}).get("cfp")
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
    runs = [r for r in records if r.get("status") in ("finished", "failed")]
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
        failed = record.get("status") == "failed"
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
        from cbq.report_plots import write_plots  # matplotlib only when asked for

        for path in write_plots(records, args.plots):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

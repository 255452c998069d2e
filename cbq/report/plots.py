"""Figures of sweep results: perplexity by bit setting, CBQ's loss and its terms per window.

The functions build ``Figure`` objects without pyplot (no global state, nothing shown by
itself): display one with IPython's ``display(fig)``, save them with :func:`save_figures`,
which renders with the Agg backend. :func:`write_plots` does both for ``cbq.report``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cbq.report.runs import (
    Record,
    at_reference,
    bits_order,
    cfp_label,
    is_cbq,
    lookup,
    loss_label,
    method_name,
    ppl,
    ppl_corpora,
    rounding_label,
    setting,
    window_label,
)
from cbq.results import Status

FP_STYLE = {"color": "0.4", "linestyle": "--", "linewidth": 1.2}
# Config fields that may tell CBQ runs apart, as (legend name, value of a run).
RUN_FIELDS: tuple[tuple[str, Any], ...] = (
    ("quant", lambda r: lookup(r, "quant.name")),
    ("window", window_label),
    ("loss", loss_label),
    ("rounding", rounding_label),
    ("cfp", cfp_label),
    ("samples", lambda r: lookup(r, "data.n_samples")),
    ("epochs", lambda r: lookup(r, "method.epochs")),
)


def finished(records: Sequence[Record]) -> list[Record]:
    return [r for r in records if r.status is Status.finished]


def models(records: Sequence[Record]) -> list[str]:
    return list(dict.fromkeys(str(lookup(r, "model.name")) for r in records))


def setting_families(records: Sequence[Record]) -> dict[str, list[str]]:
    """The quantized settings in bit order: ``{"weight-only": [...], "weights and
    activations": [...]}``, an empty family left out."""
    quantized = sorted((r for r in records if method_name(r) != "fp"), key=bits_order)
    families: dict[str, list[str]] = {}
    for record in quantized:
        name = "weights and activations" if bits_order(record)[0] else "weight-only"
        family = families.setdefault(name, [])
        if str(setting(record)) not in family:
            family.append(str(setting(record)))
    return families


def method_colors(records: Sequence[Record]) -> dict[str, str]:
    """A colour per method, the same in every panel."""
    methods = dict.fromkeys(str(method_name(r)) for r in records if method_name(r) != "fp")
    return {method: f"C{i % 10}" for i, method in enumerate(methods)}


def ppl_series(
    records: Sequence[Record], corpus: str
) -> tuple[dict[str, dict[str, float]], float | None]:
    """``{method: {setting: ppl}}`` and the FP perplexity on ``corpus``, from the finished
    runs of one model (later runs replace earlier ones)."""
    series: dict[str, dict[str, float]] = {}
    fp = None
    for record in records:
        value = ppl(record, corpus)
        if value is None:
            continue
        if method_name(record) == "fp":
            fp = value
        else:
            series.setdefault(str(method_name(record)), {})[str(setting(record))] = value
    return series, fp


def draw_ppl_vs_bits(ax: Axes, records: Sequence[Record], corpus: str) -> None:
    """A line per method across the settings, broken where a setting has no value and
    between weight-only and weight-and-activation settings (a dotted line); FP dashed."""
    named = setting_families([r for r in records if ppl(r, corpus) is not None])
    families = list(named.values())
    settings = [name for family in families for name in family]
    series, fp = ppl_series(records, corpus)
    colors = method_colors(records)
    for method in [m for m in colors if m in series]:
        values, label = series[method], method
        for family in families:
            for xs in _segments([settings.index(name) for name in family if name in values]):
                ys = [values[settings[x]] for x in xs]
                ax.plot(xs, ys, marker="o", color=colors[method], label=label)
                label = "_nolegend_"
    if len(families) > 1:
        ax.axvline(len(families[0]) - 0.5, color="0.6", linestyle=":", linewidth=1)
    if fp is not None:
        ax.axhline(fp, label=f"fp ({fp:.2f})", **FP_STYLE)
    ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_title(f"perplexity on {corpus}")
    ax.set_xlabel(" | ".join(named) + " (most bits first)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def _segments(xs: list[int]) -> list[list[int]]:
    """Runs of consecutive positions: a line never bridges a setting without a value."""
    runs: list[list[int]] = []
    for x in xs:
        if runs and runs[-1][-1] == x - 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return runs


def ppl_vs_bits_figures(records: Sequence[Record]) -> dict[str, Figure]:
    """One figure per model with runs at two settings or more: a panel per corpus, a line
    per method (CBQ at its reference components) and FP as a dashed line."""
    runs = at_reference(finished(records))
    figures = {}
    for model in models(runs):
        mine = [r for r in runs if lookup(r, "model.name") == model]
        corpora = list(dict.fromkeys(c for r in mine for c in ppl_corpora(r) if ppl(r, c)))
        if not corpora or sum(map(len, setting_families(mine).values())) < 2:
            continue
        fig = Figure(figsize=(1 + 5.5 * len(corpora), 4.2), layout="constrained")
        axes = fig.subplots(1, len(corpora), squeeze=False)[0]
        for ax, corpus in zip(axes, corpora, strict=True):
            draw_ppl_vs_bits(ax, mine, corpus)
        fig.suptitle(f"{model}: perplexity by quantization setting")
        figures[f"ppl_vs_bits_{_slug(model)}"] = fig
    return figures


def run_labels(records: Sequence[Record]) -> list[str]:
    """A legend label per run: the config fields that differ between the runs."""
    varying = [
        (name, value) for name, value in RUN_FIELDS if len({str(value(r)) for r in records}) > 1
    ] or [RUN_FIELDS[0]]
    return [", ".join(f"{name} {value(r)}" for name, value in varying) for r in records]


def draw_window_losses(ax: Axes, records: Sequence[Record]) -> None:
    """Final loss per window, one line per run. With different window schedules the x axis
    is the window's first block, so that lines line up by depth."""
    schedules = [[tuple(w["blocks"]) for w in r.stats["windows"]] for r in records]
    by_block = len({tuple(s) for s in schedules}) > 1
    for record, schedule, label in zip(records, schedules, run_labels(records), strict=True):
        losses = [w["final_loss"] for w in record.stats["windows"]]
        xs = [blocks[0] for blocks in schedule] if by_block else list(range(len(losses)))
        ax.plot(xs, losses, marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("first block of the window" if by_block else "window index")
    ax.set_ylabel("final reconstruction loss (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def per_model_figures(
    runs: Sequence[Record], draw: Callable[[Axes, list[Record]], None], name: str, title: str
) -> dict[str, Figure]:
    """One figure per model, ``draw`` on its runs (of runs with the same label, the latest):
    ``{name}_{model}`` -> figure titled ``{model}: {title}``."""
    figures = {}
    for model in models(runs):
        mine = [r for r in runs if lookup(r, "model.name") == model]
        latest = dict(zip(run_labels(mine), mine, strict=True))
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        draw(fig.subplots(), list(latest.values()))
        fig.suptitle(f"{model}: {title}")
        figures[f"{name}_{_slug(model)}"] = fig
    return figures


def window_loss_figures(records: Sequence[Record]) -> dict[str, Figure]:
    """One figure per model of the CBQ runs that recorded their windows."""
    runs = [r for r in records if is_cbq(r) and _windows(r)]
    runs = [r for r in runs if r.status in (Status.finished, Status.failed)]
    return per_model_figures(
        runs, draw_window_losses, "window_loss", "CBQ loss at the end of each window"
    )


def _windows(record: Record) -> list[dict[str, Any]]:
    return record.stats.get("windows") or []


def kl_share(terms: dict[str, float]) -> float | None:
    """The KL term's share of a window's L2 + KL loss (None when it has not both)."""
    if not {"l2", "kl"} <= set(terms):
        return None
    total = terms["l2"] + terms["kl"]
    return terms["kl"] / total if total > 0 else None


def draw_loss_balance(ax: Axes, records: Sequence[Record]) -> None:
    """KL's share of each window's loss, before training (dashed) and after hardening."""
    for record, label in zip(records, run_labels(records), strict=True):
        windows = _windows(record)
        color = None
        for when, style in (("hard", "-"), ("init", "--")):
            shares = [kl_share(w.get(f"loss_terms_{when}", {})) for w in windows]
            xs = range(len(shares))
            (line,) = ax.plot(xs, shares, style, marker=".", color=color, label=f"{label}, {when}")
            color = line.get_color()  # a run's two lines share its colour
    ax.set_ylim(0, 1)
    ax.set_xlabel("window index")
    ax.set_ylabel("KL share of the L2 + KL loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def loss_balance_figures(records: Sequence[Record]) -> dict[str, Figure]:
    """One figure per model of the CBQ runs whose windows recorded their L2 and KL terms."""
    runs = [
        r
        for r in records
        if is_cbq(r)
        and r.status is Status.finished
        and any(kl_share(w.get("loss_terms_hard", {})) is not None for w in _windows(r))
    ]
    return per_model_figures(
        runs, draw_loss_balance, "loss_balance", "the balance of CBQ's loss terms per window"
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def save_figures(figures: dict[str, Figure], out_dir: Path, dpi: int = 120) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        FigureCanvasAgg(fig)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def write_plots(records: Sequence[Record], out_dir: Path) -> list[Path]:
    """Every plot of these runs as PNG files in ``out_dir``."""
    figures = ppl_vs_bits_figures(records) | window_loss_figures(records)
    figures |= loss_balance_figures(records)
    return save_figures(figures, out_dir)

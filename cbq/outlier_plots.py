"""Figures of outlier statistics (``notebooks/outliers.ipynb``).

Per-channel activation ranges and weight histograms before and after coarse-to-fine
pre-processing (CFP, ``cbq.cfp``), with the detected outliers and thresholds marked, in the
manner of the CBQ paper's Figures 1 and 3.

The functions draw on a given ``Axes``, or build a ``Figure`` without pyplot (no global
state, nothing shown by itself): display it with IPython's ``display(fig)``, save it with
:func:`save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

BEFORE_COLOR = "0.55"
OUTLIER_COLOR = "tab:red"
FENCE_COLOR = "0.3"
AFTER_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
# Relative change below which a channel counts as unchanged (float error of an exact fold).
UNCHANGED_RTOL = 1e-4


def figure_grid(
    nrows: int, ncols: int, panel_size: tuple[float, float] = (3.6, 2.5)
) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure and its axes as a 2-D array (nrows, ncols)."""
    width, height = panel_size
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def changed_channels(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries of ``after`` that differ from ``before`` beyond float error."""
    return (after - before).abs() > UNCHANGED_RTOL * before.abs().clamp_min(1e-12)


def plot_channel_absmax(
    ax: Axes,
    before: torch.Tensor,
    after: Mapping[str, torch.Tensor],
    outliers: torch.Tensor,
    *,
    fence: float | None = None,
    threshold: float | None = None,
    log: bool = True,
) -> None:
    """Max |x| per channel: ``before`` as a grey line, each ``after`` (label -> values) as
    markers on the channels it changed only, ``outliers`` (bool mask) as red crosses, the
    coarse ``fence`` as a dotted and the fine ``threshold`` as a dashed line.

    Labels are the same in every panel, for one legend per figure (:func:`figure_legend`).
    """
    before = before.detach().float().cpu()
    channels = np.arange(before.numel())
    ax.plot(channels, before.numpy(), color=BEFORE_COLOR, lw=0.7, label="before")
    for (label, values), color in zip(after.items(), AFTER_COLORS, strict=False):
        values = values.detach().float().cpu()
        moved = changed_channels(before, values)
        ax.scatter(
            channels[moved.numpy()],
            values[moved].numpy(),
            marker="v",
            s=28,
            color=color,
            zorder=3,
            label=f"after, {label}",
        )
    mask = outliers.detach().cpu().numpy()
    ax.scatter(
        channels[mask],
        before.numpy()[mask],
        marker="x",
        s=36,
        color=OUTLIER_COLOR,
        zorder=4,
        label="outlier channels",
    )
    _hline(ax, fence, ":", FENCE_COLOR, "coarse fence")
    _hline(ax, threshold, "--", OUTLIER_COLOR, "fine threshold t")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("channel")
    ax.set_ylabel("max |x|")


def plot_weight_histogram(
    ax: Axes,
    before: torch.Tensor,
    after: Mapping[str, torch.Tensor],
    *,
    lines: Mapping[str, float] | None = None,
    bins: int = 161,
) -> None:
    """Histogram (log count) of the weight values ``before`` (filled grey) and of each
    ``after`` (label -> weight, outlined), with vertical lines at ±value for each entry of
    ``lines`` (label -> magnitude, e.g. the fine threshold or the clip level)."""
    tensors = [before, *after.values()]
    arrays = [t.detach().float().cpu().reshape(-1).numpy() for t in tensors]
    edge = max(float(np.abs(a).max()) for a in arrays) * 1.02
    edges = np.linspace(-edge, edge, bins + 1)
    ax.hist(arrays[0], edges, color=BEFORE_COLOR, alpha=0.6, label="before", log=True)
    for label, array, color in zip(after, arrays[1:], AFTER_COLORS, strict=False):
        ax.hist(array, edges, histtype="step", color=color, label=f"after, {label}", log=True)
    styles = ("--", ":", "-.")
    for (label, value), style in zip((lines or {}).items(), styles, strict=False):
        _vlines(ax, value, style, label)
    ax.set_ylim(bottom=0.5)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")


def plot_ratio_by_block(
    ax: Axes,
    blocks: Sequence[int],
    before: Sequence[float],
    after: Mapping[str, Sequence[float]],
) -> None:
    """A per-block statistic (e.g. max/median of the channel ranges), before and after."""
    ax.plot(blocks, before, color=BEFORE_COLOR, marker="o", ms=3, lw=1.5, label="before")
    for (label, values), color in zip(after.items(), AFTER_COLORS, strict=False):
        ax.plot(blocks, values, color=color, marker=".", ms=3, lw=0.9, label=f"after, {label}")
    ax.set_yscale("log")
    ax.set_xlabel("block")


def figure_legend(fig: Figure, axes: np.ndarray, ncols: int = 6) -> None:
    """One legend below the panels, with every label found in any of ``axes`` once."""
    entries: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncols=ncols)


def save_figure(fig: Figure, directory: str | Path, name: str, dpi: int = 110) -> Path:
    """Write ``fig`` to ``directory/name.png`` (creating the directory); returns the path."""
    path = Path(directory).expanduser() / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _hline(ax: Axes, value: float | None, style: str, color: str, label: str) -> None:
    if value is not None and math.isfinite(value):
        ax.axhline(value, ls=style, lw=0.9, color=color, label=label)


def _vlines(ax: Axes, value: float, style: str, label: str) -> None:
    if not math.isfinite(value):
        return
    ax.axvline(value, ls=style, lw=0.9, color=OUTLIER_COLOR, label=f"±{label} {value:.3g}")
    ax.axvline(-value, ls=style, lw=0.9, color=OUTLIER_COLOR)

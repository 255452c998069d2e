"""Which jobs of a multirun are worth running.

A sweep is a product of axes, and not every method reads every axis: ``method=fp`` ignores
``quant``, only CBQ reads ``window``/``loss``/``cfp``/``rounding``, AWQ is weight-only and
SmoothQuant/OS+ are for quantized activations. In a multirun such a job is recorded as
skipped (with the reason) instead of repeating an identical run or running a method outside
its purpose. A single run is never skipped: asking for it explicitly means it.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from cbq.config import Config
from cbq.methods.base import QuantMethod


def swept_axes(overrides: list[str]) -> dict[str, list[str]]:
    """``{"quant": ["w4a16", "w8a8"]}`` for every sweep (``a,b``) among ``overrides``; the
    last override of a key wins, as in Hydra."""
    axes: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.is_sweep_override():
            axes[key] = [str(value) for value in override.sweep_string_iterator()]
        else:
            axes.pop(key, None)
    return axes


def sweep_overrides(sweep_dir: Path) -> list[str]:
    """The sweeper's params then the command line's overrides of a multirun, from the
    ``multirun.yaml`` Hydra writes into the sweep dir before launching jobs."""
    saved = OmegaConf.load(sweep_dir / "multirun.yaml")
    params = saved.hydra.sweeper.params or {}
    return [f"{key}={params[key]}" for key in params] + list(saved.hydra.overrides.task)


def skip_reason(
    cfg: Config,
    method: type[QuantMethod],
    choices: dict[str, str],
    axes: dict[str, list[str]],
) -> str | None:
    """Why this job of a sweep is skipped, or None to run it. ``choices`` are the job's
    config-group choices, ``axes`` the sweep's values per key (see :func:`swept_axes`)."""
    reason = method.inapplicable_reason(cfg.quant)
    if reason:
        return reason
    for group in method.ignored_groups:
        values = axes.get(group, [])
        if len(values) > 1 and choices.get(group) != values[0]:
            return f"{method.name} does not read {group}: it runs once, at {group}={values[0]}"
    return None

"""Weights & Biases logging: offline by default, never needs an account.

Offline runs are written under ``<run_dir>/wandb`` and can be uploaded later with
``wandb sync <run_dir>/wandb/offline-run-*``. ``logger.mode=disabled`` turns W&B off.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class LoggerMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    mode: LoggerMode = LoggerMode.offline
    project: str = "cbq"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


class Tracker:
    """A thin wrapper so the rest of the code never imports wandb or checks the mode."""

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        config: dict[str, Any],
        name: str,
        group: str | None = None,
        tags: list[str] | None = None,
    ):
        self.run = None
        if cfg.mode is LoggerMode.disabled:
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        if cfg.mode is LoggerMode.offline:
            # Offline must never touch the network, whatever the user's environment says.
            os.environ["WANDB_MODE"] = "offline"
        import wandb

        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=group or cfg.group,
            tags=tags or list(cfg.tags) or None,
            name=name,
            dir=str(run_dir),
            mode=cfg.mode.value,
            config=config,
            reinit="finish_previous",
        )
        log.info("W&B %s run in %s", cfg.mode.value, run_dir / "wandb")

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

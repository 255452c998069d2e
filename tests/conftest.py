from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cbq.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Tests never reach the network: W&B offline, HF hub offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def compose_cfg() -> Iterator:
    """compose_cfg(overrides) -> the DictConfig Hydra would build for `python -m cbq`."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):

        def _compose(overrides: list[str] | None = None) -> DictConfig:
            return compose(config_name="config", overrides=overrides or [])

        yield _compose

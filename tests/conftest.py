from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cbq.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Tests never reach the network: W&B offline, HF hub offline. huggingface_hub reads
# HF_HUB_OFFLINE when it is imported: the fixtures below import cbq.models (transformers)
# and helpers only when they run.
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


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A small English text file (``tiny.txt``) used as calibration and evaluation corpus."""
    from cbq.models.tiny import TRAINING_TEXT

    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text((TRAINING_TEXT + "\n") * 20)
    return path


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory) -> Callable[[str], Path]:
    """saved_tiny_model(family) -> a directory holding that tiny model and the tiny tokenizer,
    saved once per family and session."""
    from cbq.models import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("models")
    saved: dict[str, Path] = {}

    def _saved(family: str) -> Path:
        if family not in saved:
            path = root / family
            tiny_model(family).save_pretrained(path)
            tiny_tokenizer().save_pretrained(path)
            saved[family] = path
        return saved[family]

    return _saved


@pytest.fixture
def tiny_run(compose_cfg, saved_tiny_model, tiny_corpus, tmp_path) -> Callable[..., tuple]:
    """tiny_run(family, *overrides, max_eval_windows=8, run_dir=tmp_path) -> (metrics, the
    results.json record) of a run of the Hydra entry point on the saved tiny model of
    ``family``, with the tiny corpus for calibration and evaluation."""
    from cbq.run import run

    from helpers import run_overrides

    def _run(
        family: str, *extra: str, max_eval_windows: int = 8, run_dir: Path | None = None
    ) -> tuple[dict, dict]:
        run_dir = run_dir or tmp_path
        model_dir = saved_tiny_model(family)
        overrides = run_overrides(model_dir, tiny_corpus, *extra, max_eval_windows=max_eval_windows)
        metrics = run(compose_cfg(overrides), run_dir)
        return metrics, json.loads((run_dir / "results.json").read_text())

    return _run

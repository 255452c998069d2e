"""What the benchmarks share."""

from __future__ import annotations

from pathlib import Path

import torch

from cbq.data import calibration_batch
from cbq.models.loader import load_model


def first_blocks(model: str, blocks: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The packaged ``model`` cut to its first ``blocks`` blocks, and the preset=cpu
    calibration tokens (16 x 256 of wiki-sample, seed 0)."""
    base, tokenizer = load_model(model, None, cache_dir=Path("~/.cache/cbq").expanduser())
    base.model.layers = base.model.layers[:blocks]
    base.config.num_hidden_layers = blocks
    return base, calibration_batch("wiki-sample", tokenizer, n_samples=16, seqlen=256, seed=0)

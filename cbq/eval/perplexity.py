"""Perplexity with the GPTQ protocol: mean next-token NLL over fixed windows, exponentiated.

Each window is scored on its own (no context carried across windows); the NLL of every
predicted token (``seqlen - 1`` per window) counts equally. Logits are produced in chunks
of tokens so that a 262k-token vocabulary (Gemma3) never needs a full (t, vocab) tensor.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional
from tqdm.auto import tqdm

from cbq.models.adapter import ModelAdapter

LOGIT_CHUNK_TOKENS = 512


@torch.no_grad()
def window_nll(adapter: ModelAdapter, window: torch.Tensor) -> tuple[float, int]:
    """Summed NLL and number of predicted tokens for a batch of windows (b, t)."""
    hidden = adapter.embed(window)
    ctx = adapter.block_context(hidden)
    for index in range(len(adapter.blocks())):
        hidden = adapter.forward_block(index, hidden, ctx)
    hidden, targets = hidden[:, :-1], window[:, 1:]
    total = 0.0
    for start in range(0, hidden.shape[1], LOGIT_CHUNK_TOKENS):
        logits = adapter.logits(hidden[:, start : start + LOGIT_CHUNK_TOKENS]).float()
        chunk_targets = targets[:, start : start + LOGIT_CHUNK_TOKENS]
        total += functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk_targets.reshape(-1), reduction="sum"
        ).item()
    return total, targets.numel()


def perplexity(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    desc: str = "ppl",
    bf16: bool = False,
) -> float:
    """exp(mean NLL) of the model over ``windows`` shaped (n, seqlen); with ``bf16`` the
    forward runs under bf16 autocast (the NLL itself is always taken in float32)."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(
            f"expected a non-empty (n_windows, seqlen) tensor, got {tuple(windows.shape)}"
        )
    total_nll, total_tokens = 0.0, 0
    batches = windows.split(batch_size)
    device_type = torch.device(device).type
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            nll, count = window_nll(adapter, batch.to(device))
        total_nll += nll
        total_tokens += count
    return math.exp(total_nll / total_tokens)

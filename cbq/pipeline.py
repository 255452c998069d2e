"""The sequential block pipeline of the block-wise methods: RTN (static activations), GPTQ,
AWQ, SmoothQuant, OS+ and OmniQuant. CBQ (windows of several blocks) keeps its own loop for
now and shares the block runner, the fingerprint and the atomic saves.

The calibration stream enters block 0; each block is quantized by the method on the stream
that the quantized blocks before it produce, then the stream advances through it. A method
that trains against the FP model (OmniQuant) also gets the FP stream, which advances through
the FP block's output the method computed as its target: every FP block runs once. The method
only supplies the work for one block. The pipeline owns the stream, the progress bar and the
checkpoints: after every block, the block's final state (written once) and the streams go to
``<run dir>/checkpoint/<method>/``, atomically, so that a killed run resumes after the last
finished block and ends with the same model as an uninterrupted run. A finished run deletes
its checkpoint (it is cheap to redo, unlike CBQ's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cbq.blockwise import context_for, embed_batches, run_block
from cbq.files import atomic_write
from cbq.models.adapter import BlockContext, ModelAdapter

log = logging.getLogger(__name__)


@dataclass
class Streams:
    """The cached hidden states entering the current block, (n, t, h) each."""

    quantized: torch.Tensor  # the quantized blocks' outputs so far: the block's input
    fp: torch.Tensor | None = None  # the FP model's, where the method asks for them
    # Set by the work of a method that tracks ``fp``: the FP block's output on ``fp``
    # (its target, computed before the block is quantized).
    fp_next: torch.Tensor | None = None


# The work for one block: quantize block ``index`` in place from the streams entering it;
# returns the block's statistics.
BlockWork = Callable[[int, Streams, BlockContext], dict[str, Any]]


def settings_fingerprint(settings: Any, calib: torch.Tensor | None) -> str:
    """Identifies a run's checkpoint: changes with any setting or with the calibration data."""
    payload = json.dumps(
        {
            "settings": settings,
            "calib": None if calib is None else calib.sum().item(),
            "calib_shape": None if calib is None else list(calib.shape),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cpu_state(module: nn.Module) -> dict[str, Any]:
    """A copy of ``module``'s state on the CPU (extra states, not tensors, as they are)."""
    return {
        k: v.detach().cpu().clone() if torch.is_tensor(v) else v
        for k, v in module.state_dict().items()
    }


def atomic_save(payload: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


@dataclass(frozen=True)
class Checkpoint:
    """Where a block-wise run checkpoints, and what identifies it."""

    folder: Path
    fingerprint: str
    # Rebuild block ``index``'s modules as the method leaves them (say, wrapped in
    # QuantLinear) so that its saved state loads into them.
    restore: Callable[[int], Any]

    @property
    def state_path(self) -> Path:
        return self.folder / "state.pt"

    def block_path(self, index: int) -> Path:
        return self.folder / f"block_{index}.pt"


class BlockPipeline:
    # Test hook: simulate a kill after this block's checkpoint.
    stop_after_block: int | None = None

    def __init__(
        self,
        adapter: ModelAdapter,
        device: torch.device,
        batch_size: int,
        desc: str,
        checkpoint: Checkpoint | None = None,
        fp_stream: bool = False,
    ):
        self.adapter, self.device, self.batch_size = adapter, device, batch_size
        self.desc, self.checkpoint, self.fp_stream = desc, checkpoint, fp_stream
        self.resumed_at: int | None = None

    def run(self, calib: torch.Tensor, work: BlockWork) -> list[dict[str, Any]]:
        """Every block through ``work``, in order; returns each block's statistics."""
        first, streams, stats = self._resume()
        if streams is None:
            hidden = embed_batches(self.adapter, calib, self.batch_size, self.device)
            streams = Streams(hidden, hidden if self.fp_stream else None)
        ctx = context_for(self.adapter, streams.quantized, self.batch_size)
        n_blocks = len(self.adapter.blocks())
        blocks = range(first, n_blocks)
        progress = tqdm(blocks, desc=self.desc, unit="block", initial=first, total=n_blocks)
        for index in progress:
            self.adapter.residency.acquire(index)
            stats.append(work(index, streams, ctx))
            streams = self._advance(index, streams, ctx)
            self._save(index, streams, stats)
            self.adapter.residency.release(index)
            if self.stop_after_block == index:
                raise KeyboardInterrupt(f"stopped after block {index} (test hook)")
        if self.checkpoint is not None:
            shutil.rmtree(self.checkpoint.folder, ignore_errors=True)
        return stats

    def resume_stats(self) -> dict[str, int]:
        """``{"resumed_at_block": n}`` for a run that resumed a checkpoint (its quantize time
        covers only the blocks after it), else nothing."""
        return {} if self.resumed_at is None else {"resumed_at_block": self.resumed_at}

    def _advance(self, index: int, streams: Streams, ctx: BlockContext) -> Streams:
        """The streams entering block ``index + 1``."""
        quantized = run_block(self.adapter, index, streams.quantized, ctx, self.batch_size)
        if not self.fp_stream:
            return Streams(quantized)
        if streams.fp_next is None:
            raise RuntimeError(f"{self.desc}: block {index}'s work did not set Streams.fp_next")
        return Streams(quantized, streams.fp_next)

    def _save(self, index: int, streams: Streams, stats: list[dict[str, Any]]) -> None:
        if self.checkpoint is None:
            return
        atomic_save(cpu_state(self.adapter.blocks()[index]), self.checkpoint.block_path(index))
        atomic_save(
            {
                "fingerprint": self.checkpoint.fingerprint,
                "next_block": index + 1,
                "quantized": streams.quantized.cpu(),
                "fp": None if streams.fp is None else streams.fp.cpu(),
                "stats": stats,
            },
            self.checkpoint.state_path,
        )

    def _resume(self) -> tuple[int, Streams | None, list[dict[str, Any]]]:
        """The first block to run, the streams entering it and the statistics so far."""
        if self.checkpoint is None or not self.checkpoint.state_path.exists():
            return 0, None, []
        state = torch.load(self.checkpoint.state_path, weights_only=False)
        if state["fingerprint"] != self.checkpoint.fingerprint:
            raise RuntimeError(
                f"{self.checkpoint.folder} belongs to a run with other settings or calibration "
                "data; delete it or use another hydra.run.dir"
            )
        blocks = self.adapter.blocks()
        for index in range(state["next_block"]):
            self.adapter.residency.acquire(index)
            self.checkpoint.restore(index)
            blocks[index].load_state_dict(torch.load(self.checkpoint.block_path(index)))
            self.adapter.residency.release(index)
        self.resumed_at = state["next_block"]
        log.info("resumed %s at block %d", self.desc, self.resumed_at)
        fp = None if state["fp"] is None else state["fp"].to(self.device)
        return self.resumed_at, Streams(state["quantized"].to(self.device), fp), state["stats"]

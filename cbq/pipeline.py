"""The sequential pipeline every method runs on: the calibration stream walks the model in
windows of blocks.

A schedule of windows covers the blocks in order. Block-wise methods (RTN with static
activations, GPTQ, AWQ, SmoothQuant, OS+, OmniQuant, AutoRound) have one-block windows; CBQ
has windows of K blocks that overlap, so a block can be worked on in two windows before it is
committed. The calibration stream enters block 0; each window's blocks are quantized by the
method on the stream the committed quantized blocks before it produce, then the stream
advances through the blocks the window committed. A method that trains against the FP model
(OmniQuant, CBQ) also gets the FP stream, which advances through the FP output the method
computed as its target: every FP block runs once per run.

The method supplies only the work for one window (:class:`WindowWork`; a block-wise method a
:data:`BlockWork` function). The pipeline owns:

- the streams and where they live (:class:`ActivationStore`: the device, CPU memory or disk);
- moving blocks on and off the device, and loading them lazily (``adapter.residency``);
- the progress bar;
- checkpoints: after every window, each block it committed (written once) and the streams go
  to the checkpoint folder atomically, with whatever state the method keeps between windows,
  so that a killed run resumes after the last finished window and ends with the same model as
  an uninterrupted run. A finished run deletes its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from cbq.blockwise import context_for, embed_batches, run_block
from cbq.files import atomic_write
from cbq.models.adapter import BlockContext, ModelAdapter

log = logging.getLogger(__name__)

QUANTIZED, FP = "x_q", "x_fp"  # the streams' names in the store


class Window(NamedTuple):
    """Blocks [start, end) are worked on together; blocks [start, commit_end) are final after."""

    start: int
    end: int
    commit_end: int

    @property
    def blocks(self) -> range:
        return range(self.start, self.end)

    @property
    def committed(self) -> range:
        return range(self.start, self.commit_end)


def window_schedule(n_blocks: int, size: int, overlap: int) -> list[Window]:
    """Windows of ``size`` blocks, consecutive ones sharing ``overlap``; the last ends at the
    model's last block and commits everything left."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"window.size={size}, window.overlap={overlap}: need 0 <= overlap < size")
    stride, start, schedule = size - overlap, 0, []
    while True:
        end = min(start + size, n_blocks)
        last = end == n_blocks
        schedule.append(Window(start, end, end if last else start + stride))
        if last:
            return schedule
        start += stride


class CacheKind(StrEnum):
    """Where the cached streams live: the device, CPU memory, or memory-mapped on disk."""

    device = "device"
    cpu = "cpu"
    disk = "disk"


class ActivationStore:
    """Named cached activations, (n, t, h) each, where ``kind`` says; batches come to the device."""

    def __init__(self, kind: CacheKind, device: torch.device, folder: Path):
        self.kind, self.device, self.folder = CacheKind(kind), device, folder
        self._tensors: dict[str, torch.Tensor] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self.kind is CacheKind.disk:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{name}.pt"
            torch.save(tensor.cpu(), path)
            tensor = torch.load(path, mmap=True)
        else:
            tensor = tensor.to(self.device if self.kind is CacheKind.device else "cpu")
        self._tensors[name] = tensor

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def has(self, name: str) -> bool:
        return name in self._tensors

    def drop(self, name: str) -> None:
        del self._tensors[name]
        if self.kind is CacheKind.disk:
            (self.folder / f"{name}.pt").unlink(missing_ok=True)

    def batch(self, name: str, index: torch.Tensor) -> torch.Tensor:
        return self._tensors[name][index].to(self.device)


@dataclass
class Streams:
    """The cached hidden states entering the current window, (n, t, h) each."""

    quantized: torch.Tensor  # the committed quantized blocks' outputs: the window's input
    fp: torch.Tensor | None = None  # the FP model's, where the method asks for them
    # Set by the work of a method that tracks ``fp``: the FP stream entering the first block
    # after the window's committed ones (an FP output the method computed as its target).
    fp_next: torch.Tensor | None = None


class WindowWork(Protocol):
    """A method's work for one window, and the state it keeps from one window to the next."""

    def __call__(
        self, number: int, window: Window, streams: Streams, ctx: BlockContext
    ) -> dict[str, Any]:
        """Work on the window's blocks (on the device); blocks ``window.committed`` must be
        final after it. Returns the window's record."""
        ...

    def state(self) -> Any:
        """What a resumed run needs besides the committed blocks and the streams."""
        ...

    def load_state(self, state: Any) -> None: ...


# The work for one block of a block-wise method: quantize block ``index`` in place from the
# streams entering it; returns the block's statistics.
BlockWork = Callable[[int, Streams, BlockContext], dict[str, Any]]


@dataclass(frozen=True)
class BlockWise:
    """A block-wise method's work as the work of one-block windows; it keeps no state."""

    work: BlockWork

    def __call__(
        self, number: int, window: Window, streams: Streams, ctx: BlockContext
    ) -> dict[str, Any]:
        return self.work(window.start, streams, ctx)

    def state(self) -> None:
        return None

    def load_state(self, state: None) -> None:
        pass


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
    """Where a run checkpoints, and what identifies it."""

    folder: Path
    fingerprint: str
    # Rebuild block ``index``'s modules as the method leaves a committed block (say, wrapped
    # in QuantLinear) so that its saved state loads into them.
    restore: Callable[[int], Any]

    @property
    def state_path(self) -> Path:
        return self.folder / "state.pt"

    @property
    def streams_folder(self) -> Path:
        return self.folder / "streams"

    def block_path(self, index: int) -> Path:
        return self.folder / f"block_{index}.pt"

    def remove(self) -> None:
        """The folder, and the checkpoint folder above it once no other method's is left."""
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


class BlockPipeline:
    # Test hook: simulate a kill after this window's checkpoint.
    stop_after_window: int | None = None

    def __init__(
        self,
        adapter: ModelAdapter,
        device: torch.device,
        batch_size: int,
        desc: str,
        checkpoint: Checkpoint | None = None,
        fp_stream: bool = False,
        schedule: list[Window] | None = None,
        cache: CacheKind = CacheKind.device,
    ):
        if cache is CacheKind.disk and checkpoint is None:
            raise ValueError(f"{desc}: cache=disk keeps the streams in the checkpoint folder")
        self.adapter, self.device, self.batch_size = adapter, device, batch_size
        self.desc, self.checkpoint, self.fp_stream = desc, checkpoint, fp_stream
        self.schedule = schedule or window_schedule(len(adapter.blocks()), 1, 0)
        # The folder is used only by cache=disk, which has a checkpoint.
        self.store = ActivationStore(
            cache, device, checkpoint.streams_folder if checkpoint else Path()
        )
        self.resumed_at: int | None = None

    @property
    def block_wise(self) -> bool:
        return all(len(window.blocks) == 1 for window in self.schedule)

    def run(self, calib: torch.Tensor, work: BlockWork) -> list[dict[str, Any]]:
        """Every block through a block-wise method's ``work``, in order; returns each block's
        statistics."""
        return self.run_windows(calib, BlockWise(work))

    def run_windows(self, calib: torch.Tensor, work: WindowWork) -> list[dict[str, Any]]:
        """Every window of the schedule through ``work``, in order; returns their records."""
        first, records = self._resume(work)
        if first == 0:
            hidden = embed_batches(self.adapter, calib, self.batch_size, self.device)
            self.store.put(QUANTIZED, hidden)
            if self.fp_stream:
                self.store.put(FP, hidden)
        ctx = context_for(self.adapter, self.store.get(QUANTIZED), self.batch_size)
        n_blocks = len(self.adapter.blocks())
        done = self.schedule[first - 1].commit_end if first else 0
        progress = tqdm(desc=self.desc, unit="block", initial=done, total=n_blocks)
        for number in range(first, len(self.schedule)):
            window = self.schedule[number]
            for index in window.blocks:
                self._acquire(index)
            streams = Streams(
                self.store.get(QUANTIZED), self.store.get(FP) if self.fp_stream else None
            )
            records.append(work(number, window, streams, ctx))
            self._advance(window, streams, ctx)
            self._save(number, records, work)
            for index in window.committed:
                self._release(index)
            progress.update(len(window.committed))
            if self.stop_after_window == number:
                raise KeyboardInterrupt(f"stopped after window {number} (test hook)")
        progress.close()
        for name in (QUANTIZED, FP):
            if self.store.has(name):
                self.store.drop(name)
        if self.checkpoint is not None:
            self.checkpoint.remove()
        return records

    def resume_stats(self) -> dict[str, int]:
        """``{"resumed_at_block": n}`` (``resumed_at_window`` for windows of several blocks)
        for a run that resumed a checkpoint (its quantize time covers only what came after),
        else nothing."""
        if self.resumed_at is None:
            return {}
        return {f"resumed_at_{'block' if self.block_wise else 'window'}": self.resumed_at}

    def _acquire(self, index: int) -> None:
        self.adapter.residency.acquire(index)
        self.adapter.blocks()[index].to(self.device)

    def _release(self, index: int) -> None:
        if self.device.type != "cpu":
            self.adapter.blocks()[index].to("cpu")
        self.adapter.residency.release(index)

    def _advance(self, window: Window, streams: Streams, ctx: BlockContext) -> None:
        """The streams through the blocks the window committed."""
        quantized = streams.quantized
        for index in window.committed:
            quantized = run_block(self.adapter, index, quantized, ctx, self.batch_size)
        self.store.put(QUANTIZED, quantized)
        if not self.fp_stream:
            return
        if streams.fp_next is None:
            raise RuntimeError(f"{self.desc}: window {window}'s work did not set Streams.fp_next")
        self.store.put(FP, streams.fp_next)

    def _save(self, number: int, records: list[dict[str, Any]], work: WindowWork) -> None:
        if self.checkpoint is None:
            return
        blocks = self.adapter.blocks()
        for index in self.schedule[number].committed:
            atomic_save(cpu_state(blocks[index]), self.checkpoint.block_path(index))
        atomic_save(
            {
                "fingerprint": self.checkpoint.fingerprint,
                "next_window": number + 1,
                "quantized": self.store.get(QUANTIZED).cpu(),
                "fp": self.store.get(FP).cpu() if self.fp_stream else None,
                "records": records,
                "work": work.state(),
            },
            self.checkpoint.state_path,
        )

    def _resume(self, work: WindowWork) -> tuple[int, list[dict[str, Any]]]:
        """The first window to run and the records so far; restores the committed blocks,
        the streams and the method's state."""
        if self.checkpoint is None:
            return 0, []
        if not self.checkpoint.state_path.exists():
            shutil.rmtree(self.checkpoint.folder, ignore_errors=True)  # a dead run's blocks
            return 0, []
        state = torch.load(self.checkpoint.state_path, weights_only=False)
        if state["fingerprint"] != self.checkpoint.fingerprint:
            raise RuntimeError(
                f"{self.checkpoint.folder} belongs to a run with other settings or calibration "
                "data; delete it or use another hydra.run.dir"
            )
        blocks = self.adapter.blocks()
        for index in range(self.schedule[state["next_window"] - 1].commit_end):
            self.adapter.residency.acquire(index)
            self.checkpoint.restore(index)
            blocks[index].load_state_dict(torch.load(self.checkpoint.block_path(index)))
            self.adapter.residency.release(index)
        work.load_state(state["work"])
        self.store.put(QUANTIZED, state["quantized"])
        if self.fp_stream:
            self.store.put(FP, state["fp"])
        self.resumed_at = state["next_window"]
        log.info("resumed %s at window %d", self.desc, self.resumed_at)
        return self.resumed_at, state["records"]

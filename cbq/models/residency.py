"""Where the decoder blocks' weights live between the moments a method or the evaluation
uses them: models larger than RAM (``model.lazy=true``).

By default every block is resident (:class:`ResidentBlocks`: nothing to do). A lazy model
(:class:`LazyBlocks`) is built as a skeleton whose block tensors are on the meta device; the
embeddings, final norm and LM head are loaded at once. The pipelines call :meth:`acquire`
before a block's work, which reads that block's tensors from the checkpoint's safetensors
files, and :meth:`release` once the block is committed, which writes the block as it is then
(quantized, wrapped) to the run's offload folder and frees it. Evaluation walks the blocks the
same way (:meth:`acquire`, then :meth:`evict`, which frees without writing). So at most the
blocks of one window are in memory at any time, whatever the depth.
"""

from __future__ import annotations

import ctypes
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cbq.files import atomic_write

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ResidentBlocks:
    """Every block in memory all the time (an ordinary, eagerly loaded model)."""

    lazy = False

    def acquire(self, index: int) -> None:
        """Make block ``index``'s tensors real (on the CPU)."""

    def release(self, index: int) -> None:
        """Block ``index`` is final: keep it where it can be read back, and free it."""

    def evict(self, index: int) -> None:
        """Free block ``index`` without writing it (it has not changed since it was read)."""


class LazyBlocks(ResidentBlocks):
    """Block tensors read from safetensors files on first use and written out when released."""

    lazy = True

    def __init__(
        self,
        blocks: nn.ModuleList,
        block_prefixes: list[str],
        sources: dict[str, Path],
        offload_dir: Path,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.blocks, self.prefixes = blocks, block_prefixes
        self.sources, self.offload_dir = sources, offload_dir
        self.dtype, self.device = dtype, device
        self.resident: set[int] = set()
        self.released: set[int] = set()  # written to the offload folder: read back from there

    def acquire(self, index: int) -> None:
        if index in self.resident:
            return
        if index in self.released:
            unpark(self.blocks[index], self._offload_path(index), self.device)
        else:
            prefix = self.prefixes[index] + "."
            tensors = {
                name[len(prefix) :]: owned(tensor, self.dtype).to(self.device)
                for name, tensor in read_tensors(self.sources, prefix)
            }
            assign_tensors(self.blocks[index], tensors)
        self.resident.add(index)

    def release(self, index: int) -> None:
        if index not in self.resident:
            raise RuntimeError(f"block {index} is not resident; acquire it before releasing it")
        park(self.blocks[index], self._offload_path(index))
        self.released.add(index)
        self.resident.discard(index)

    def evict(self, index: int) -> None:
        to_meta(self.blocks[index])
        self.resident.discard(index)
        give_back_freed_memory()

    def _offload_path(self, index: int) -> Path:
        return self.offload_dir / f"block_{index}.safetensors"


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``). The tensors of a
    freed block leave holes in glibc's heap that it keeps: without this, a lazy RTN run's RSS
    grew by 35-50 MB per block of 59 MB in some runs (2 of 3 measured) and stayed flat with
    it (3 of 3). A no-op off glibc."""
    if LIBC is not None:
        LIBC.malloc_trim(0)


def owned(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of a tensor read by safetensors in the process's own memory (floating ones cast
    to ``dtype``). safetensors returns views of the file's memory map: kept as they are, the
    block's weights would be file pages, written to copy-on-write and freed only with the map."""
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(dtype=dtype, copy=True)
    return tensor.clone()


def safetensors_sources(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a single or a sharded checkpoint."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(
            f"model.lazy needs safetensors weights: {directory} has neither {SINGLE_FILE} "
            f"nor {INDEX_FILE}"
        )
    with safe_open(str(single), framework="pt") as file:
        return dict.fromkeys(file.keys(), single)


def read_tensors(sources: dict[str, Path], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors whose names start with ``prefix``, one file open at a time."""
    by_file: dict[Path, list[str]] = {}
    for name, file in sources.items():
        if name.startswith(prefix):
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for name in names:
                yield name, handle.get_tensor(name)


def block_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` by its dotted name, non-persistent buffers
    included (a state dict would leave those out, and they would be lost on the meta device)."""
    for owner_name, owner in module.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(owner, kind).items():
                if tensor is not None:
                    yield f"{owner_name}.{name}" if owner_name else name, tensor


def park(module: nn.Module, path: Path) -> None:
    """Write ``module``'s tensors to a safetensors file (atomically) and free them: the module
    keeps meta tensors until :func:`unpark`."""
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in block_tensors(module)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    to_meta(module)
    give_back_freed_memory()


def unpark(module: nn.Module, path: Path, device: torch.device | str) -> None:
    """The tensors :func:`park` wrote back into ``module``, on ``device``."""
    with safe_open(str(path), framework="pt") as file:
        tensors = {name: owned(file.get_tensor(name)).to(device) for name in file.keys()}  # noqa: SIM118
    assign_tensors(module, tensors)


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    owner_name, _, name = dotted.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), name


def assign_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` in place of ``module``'s tensors of the same names (meta or not),
    keeping each parameter's ``requires_grad``. Every tensor of the module must be given."""
    expected = {name for name, _ in block_tensors(module)}
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise KeyError(
            f"block tensors do not match the checkpoint: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for dotted, tensor in tensors.items():
        _put(module, dotted, tensor)


def to_meta(module: nn.Module) -> None:
    """Replace every tensor of ``module`` by a meta tensor of the same shape and dtype."""
    for dotted, tensor in list(block_tensors(module)):
        _put(module, dotted, tensor.detach().to("meta"))


def _put(module: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    """``tensor`` in place of the parameter or buffer ``dotted`` (a parameter keeps its
    ``requires_grad``)."""
    owner, name = _owner(module, dotted)
    if name in owner._parameters:
        old = owner._parameters[name]
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        owner._buffers[name] = tensor


def make_lazy(
    model: nn.Module,
    blocks: nn.ModuleList,
    directory: Path,
    offload_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
) -> LazyBlocks:
    """Fill a meta skeleton's tensors outside the blocks (embeddings, norms, head) from the
    checkpoint in ``directory``; the blocks stay on the meta device until acquired."""
    sources = safetensors_sources(directory)
    module_names = {id(module): name for name, module in model.named_modules()}
    prefixes = [module_names[id(block)] for block in blocks]
    block_prefix = tuple(prefix + "." for prefix in prefixes)
    outside = {name: file for name, file in sources.items() if not name.startswith(block_prefix)}
    for name, tensor in read_tensors(outside):
        _put(model, name, owned(tensor, dtype).to(device))
    model.tie_weights()
    block_ids = {id(t) for block in blocks for _, t in block_tensors(block)}
    empty = [
        name
        for name, tensor in block_tensors(model)
        if tensor.is_meta and id(tensor) not in block_ids
    ]
    if empty:
        raise KeyError(f"{directory}: the checkpoint has no tensor for {', '.join(empty[:5])}")
    for name, tensor in list(block_tensors(model)):  # buffers the skeleton built (rotary tables)
        if not tensor.is_meta and tensor.device != device and name not in sources:
            _put(model, name, tensor.to(device))
    return LazyBlocks(blocks, prefixes, sources, offload_dir, dtype, device)

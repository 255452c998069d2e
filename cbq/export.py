"""Export a quantized model for deployment, and load a packed export back.

Three formats, each a directory with the HF config, the tokenizer and ``cbq_quantization.json``
(the setting: bits, granularity, group size, symmetry, activation quantization with its
static scales, method, cbq version):

- ``dequantized``: a standard HF checkpoint (``model.safetensors``) whose linear weights are
  the quantized weights ``(q - z) * s`` as floats; plain ``from_pretrained`` loads it, but
  then activations run in full precision.
- ``packed``: ``cbq_packed.safetensors`` holding per quantized linear ``<name>.qweight``
  (the ``b``-bit codes of the ``(out, in)`` weight, row-major, bit-packed by
  :func:`cbq.quant.packing.pack_bits`), ``<name>.scales`` (float, ``(out, groups)``; one
  group per channel, ``(1, 1)`` per tensor), ``<name>.qzeros`` (the rounded zero points,
  packed the same way), ``<name>.bias``, and ``<name>.act_scale`` / ``<name>.act_zero`` for
  static activation quantizers; every other tensor (embeddings, norms, lm_head) as it is,
  tied copies stored once. :func:`load_packed` rebuilds the model with ``QuantLinear``
  modules whose weights are bit-identical to the exported ones.
- ``compressed_tensors``: the compressed-tensors checkpoint (``model.safetensors`` with
  ``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` per linear, or int8 weights and
  ``input_scale`` with static activations; ``quantization_config`` in ``config.json``),
  written by the compressed-tensors library (:mod:`cbq.export_compressed`).
  ``AutoModelForCausalLM.from_pretrained(dir)`` loads it with weights equal to ours and the
  activations quantized with our static scales; it is the format vLLM serves (whose kernels
  cover some of the settings: docs/export.md). Settings the format cannot express (dynamic
  per-token or symmetric dynamic activations, a partial last group) are refused before
  anything is written (:func:`check_exportable` checks a model before it is quantized).

Every exported quantized weight is checked to lie exactly on its quantizer's grid.
Exporting leaves the in-memory model's modules and weights as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

import cbq
from cbq.export_compressed import ALLOWED, UnsupportedSetting, setting_problems, shape_problems
from cbq.models import ModelAdapter
from cbq.models.registry import attn_implementation_for
from cbq.quant import (
    ActQuantizer,
    Granularity,
    QuantLinear,
    QuantSpec,
    quant_linears,
    unwrap_block,
    wrap_block,
)
from cbq.quant.packing import OffGridError, dequantize, pack_bits, unpack_bits, weight_codes

log = logging.getLogger(__name__)


class ExportFormat(StrEnum):
    none = "none"
    dequantized = "dequantized"
    packed = "packed"
    compressed_tensors = "compressed_tensors"


@dataclass
class ExportConfig:
    """Save the quantized model after the quantize phase (cbq.export)."""

    # dequantized: a plain HF checkpoint holding the quantized weights as floats;
    # packed: bit-packed integer codes + scales, reloaded by cbq.export.load_packed;
    # compressed_tensors: the compressed-tensors checkpoint (vLLM, transformers), for the
    # settings it can express (cbq.export_compressed).
    format: ExportFormat = ExportFormat.none
    # Target directory; null means <run dir>/quantized.
    dir: str | None = None

    def problems(self) -> list[str]:
        if self.dir is None:
            return []
        if not self.dir.strip():
            return ["export.dir: '' is not allowed; allowed: null (<run dir>/quantized) or a path"]
        if self.format is ExportFormat.none:
            return [
                f"export.dir: {self.dir} needs an export format (got export.format=none); "
                "allowed: export=dequantized, export=packed or export=compressed_tensors, "
                "or export.dir=null"
            ]
        return []


META_FILE = "cbq_quantization.json"
PACKED_FILE = "cbq_packed.safetensors"
LOADING = {
    ExportFormat.dequantized: "AutoModelForCausalLM.from_pretrained(dir): the quantized "
    "weights as floats; activations are NOT quantized by plain Hugging Face loading",
    ExportFormat.packed: "cbq.export.load_packed(dir): QuantLinear modules with the quantized "
    "weights and the activation quantizers of the run (not loadable by plain Hugging Face)",
    ExportFormat.compressed_tensors: "AutoModelForCausalLM.from_pretrained(dir) with "
    "compressed-tensors installed: the quantized weights, and static activation scales applied "
    "by compressed-tensors' fake quantization; the format vLLM serves (docs/export.md)",
}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: ExportFormat
    size_bytes: int


def export_model(
    model: PreTrainedModel,
    tokenizer: Any,
    directory: str | Path,
    fmt: ExportFormat | str,
    *,
    method: str,
    setting: str | None = None,
    adapter: ModelAdapter | None = None,
) -> ExportResult:
    """Write ``model`` (with its ``QuantLinear`` modules) to ``directory`` in format ``fmt``.

    ``directory`` is replaced atomically; it must not exist, be empty or hold an earlier
    export. A model without ``QuantLinear`` modules (``method=fp``) is exported as it is.
    A lazily loaded model (``adapter.residency.lazy``) is written one block at a time, each
    block read back from the run's offload folder and freed once written: a sharded
    checkpoint, one shard per block."""
    fmt = ExportFormat(fmt)
    if fmt is ExportFormat.none:
        raise ValueError("export format 'none' writes nothing")
    target = Path(directory)
    lazy = adapter is not None and adapter.residency.lazy
    meta = describe(model, fmt, method, setting)
    _warn_about(meta, fmt)
    qlinears = dict(quant_linears(model))
    if fmt is ExportFormat.compressed_tensors:
        _refuse_unsupported(qlinears)
    with _staging(target) as staging:
        compressed = fmt is ExportFormat.compressed_tensors and _quantizes_weights(qlinears)
        if lazy:
            assert adapter is not None
            _write_by_block(model, adapter, staging, fmt, meta, compressed)
        elif fmt is ExportFormat.dequantized or (
            fmt is ExportFormat.compressed_tensors and not compressed
        ):
            model.save_pretrained(staging, state_dict=plain_state(model))
        elif fmt is ExportFormat.compressed_tensors:
            # compressed-tensors (and pydantic) load only for this format
            from cbq.compressed_writer import write_compressed

            meta["compression_format"] = write_compressed(plain_model(model), qlinears, staging)
        else:
            meta["tied"] = _write_packed(model, staging / PACKED_FILE)
            _save_configs(model, staging)
        _enable_kv_cache(staging)
        tokenizer.save_pretrained(staging)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
    size = directory_size(target)
    log.info(
        "exported %s model to %s: %.2f MiB (unquantized %s: %.2f MiB)",
        fmt.value,
        target,
        size / 2**20,
        meta["dtype"],
        unquantized_size(model) / 2**20,
    )
    return ExportResult(target, fmt, size)


def _enable_kv_cache(directory: Path) -> None:
    """Runs load models with ``use_cache=False`` (calibration never decodes); an exported model
    is for generation, where the KV cache is what keeps decoding linear in length."""
    for name in ("config.json", "generation_config.json"):
        if (directory / name).exists():
            config = json.loads((directory / name).read_text())
            config["use_cache"] = True
            (directory / name).write_text(json.dumps(config, indent=2, sort_keys=True))


def describe(
    model: PreTrainedModel, fmt: ExportFormat, method: str, setting: str | None
) -> dict[str, Any]:
    """The contents of ``cbq_quantization.json`` (the packed format adds ``tied``)."""
    qlinears = dict(quant_linears(model))
    weight_spec, act_spec = _shared_specs(qlinears)
    return {
        "format": fmt.value,
        "cbq_version": cbq.__version__,
        "method": method,
        "setting": setting,
        "dtype": str(model.dtype).removeprefix("torch."),
        "loading": LOADING[fmt],
        "weights": _spec_dict(weight_spec),
        "activations": _spec_dict(act_spec),
        "static_activation_scales": static_scales(qlinears),
        "packing": "little-endian bit stream per tensor, ceil(n*bits/8) bytes (cbq.quant.packing)"
        if fmt is ExportFormat.packed
        else None,
        "quantized_linears": list(qlinears),
    }


def static_scales(qlinears: Mapping[str, QuantLinear]) -> dict[str, dict[str, float]]:
    """The calibrated static activation scales by linear (a lazy model's blocks on disk
    have none in memory: :func:`_write_by_block` adds theirs)."""
    return {
        name: {"scale": q.act_quantizer.scale.item(), "zero": q.act_quantizer.zero.item()}
        for name, q in qlinears.items()
        if q.act_quantizer.needs_calibration and not q.act_quantizer.scale.is_meta
    }


def _shared_specs(qlinears: dict[str, QuantLinear]) -> tuple[QuantSpec | None, QuantSpec | None]:
    specs = {(q.weight_quantizer.spec, q.act_quantizer.spec) for q in qlinears.values()}
    if len(specs) > 1:
        raise ValueError(f"cannot export linears quantized with different settings: {specs}")
    return next(iter(specs), (None, None))


def _spec_dict(spec: QuantSpec | None) -> dict[str, Any] | None:
    """The spec as JSON; None when nothing is quantized."""
    if spec is None or not spec.enabled:
        return None
    return {**dataclasses.asdict(spec), "granularity": spec.granularity.value}


def _spec_from(values: dict[str, Any] | None) -> QuantSpec:
    if values is None:
        return QuantSpec()
    return QuantSpec(**{**values, "granularity": Granularity(values["granularity"])})


def _quantizes_weights(qlinears: dict[str, QuantLinear]) -> bool:
    return any(q.weight_quantizer.spec.enabled for q in qlinears.values())


def compressed_tensors_problems(
    weight: QuantSpec, act: QuantSpec, in_features: Mapping[str, int]
) -> list[str]:
    """What ``export=compressed_tensors`` cannot express of this setting on linears of these
    input widths (nothing to express when neither weights nor activations are quantized)."""
    if not weight.enabled and not act.enabled:
        return []
    return setting_problems(weight, act) + shape_problems(in_features, weight)


def _refusal(problems: list[str]) -> UnsupportedSetting:
    return UnsupportedSetting(
        "export.format=compressed_tensors cannot express this setting: "
        + "; ".join(problems)
        + f". Allowed: {ALLOWED}. export=packed (cbq.export.load_packed) keeps it"
    )


def _refuse_unsupported(qlinears: dict[str, QuantLinear]) -> None:
    if not qlinears:
        return
    weight, act = _shared_specs(qlinears)
    assert weight is not None and act is not None
    widths = {name: q.in_features for name, q in qlinears.items()}
    if problems := compressed_tensors_problems(weight, act, widths):
        raise _refusal(problems)


def check_exportable(adapter: ModelAdapter, weight: QuantSpec, act: QuantSpec) -> None:
    """Refuse, before quantizing, a setting that ``export=compressed_tensors`` could not write
    for this model (its settings alone are checked by config validation)."""
    widths = {
        f"blocks[{index}].{name}": linear.in_features
        for index, block in enumerate(adapter.blocks())
        for name, linear in adapter.linears(block).items()
    }
    if problems := compressed_tensors_problems(weight, act, widths):
        raise _refusal(problems)


def _warn_about(meta: dict[str, Any], fmt: ExportFormat) -> None:
    if not meta["quantized_linears"]:
        log.warning("export: the model has no quantized linears (method=fp?); exporting it as is")
    activations = meta["activations"]
    if fmt is ExportFormat.dequantized and activations:
        log.warning(
            "export: plain Hugging Face loading of a dequantized export does NOT quantize "
            "activations (this run quantized them to %d bits); use export=packed and "
            "cbq.export.load_packed to keep them",
            activations["bits"],
        )


def _checked_weight(name: str, qlinear: QuantLinear) -> torch.Tensor:
    """The linear's quantized weight, checked to lie exactly on its quantizer's grid."""
    weight = qlinear.quantized_weight().detach()
    if qlinear.weight_quantizer.spec.enabled:
        _codes(name, qlinear, weight)
    return weight


def _codes(name: str, qlinear: QuantLinear, weight: torch.Tensor) -> torch.Tensor:
    try:
        return weight_codes(qlinear.weight_quantizer, weight)
    except OffGridError as error:
        raise OffGridError(f"{name}: {error}") from None


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model with every ``QuantLinear`` unwrapped to its linear, holding
    the quantized weight (the model itself is left as it is)."""
    qlinears = dict(quant_linears(model))
    state = {}
    for key, tensor in model.state_dict().items():
        owner, rest = _owner(key, qlinears)
        if owner is None:
            state[key] = tensor
        elif rest.startswith("linear."):
            state[f"{owner}.{rest.removeprefix('linear.')}"] = tensor
    for name, qlinear in qlinears.items():
        state[f"{name}.weight"] = _checked_weight(name, qlinear)
    return state


def plain_model(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``model`` with plain linears holding the quantized weights; it shares the
    model's other tensors (do not modify them)."""
    plain = _meta_copy(model)
    plain.load_state_dict(plain_state(model), strict=True, assign=True)
    # Non-persistent buffers (rotary tables) are not in the state dict.
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:
            owner, _, attribute = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(
                attribute, model.get_buffer(name), persistent=False
            )
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def _meta_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A model of ``model``'s architecture and dtype with plain linears, on the meta device."""
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config,
            dtype=model.dtype,
            attn_implementation=attn_implementation_for(config.model_type),
        )


def _owner(key: str, qlinears: Container[str]) -> tuple[str | None, str]:
    """The ``QuantLinear`` (by name) a state-dict key belongs to, and the key's rest under it."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in qlinears:
            return prefix, ".".join(parts[i:])
    return None, key


def _write_packed(model: nn.Module, path: Path) -> dict[str, str]:
    """Write the packed tensors; return the tied keys stored once (``{alias: stored}``)."""
    tensors, tied = _untied(_packed_tensors(model))
    _save(tensors, path, {"cbq": "packed"})
    return tied


def _packed_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The packed format's tensors of ``module``, their keys under ``prefix``."""
    qlinears = dict(quant_linears(module))
    tensors = {
        prefix + key: t
        for key, t in module.state_dict().items()
        if _owner(key, qlinears)[0] is None
    }
    for name, qlinear in qlinears.items():
        tensors.update(_packed_linear(prefix + name, qlinear))
    return tensors


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(
        {key: t.detach().cpu().contiguous() for key, t in tensors.items()},
        str(path),
        metadata={"format": "pt", **metadata},
    )


def _write_by_block(
    model: PreTrainedModel,
    adapter: ModelAdapter,
    staging: Path,
    fmt: ExportFormat,
    meta: dict[str, Any],
    compressed: bool,
) -> None:
    """A lazy model's export, one shard per block: each block is read from the offload
    folder, written, and freed. The tensors outside the blocks (embeddings, final norm, LM
    head) go to the first shard. ``meta`` gains the blocks' static activation scales.
    ``compressed``: compressed-tensors' compressors write the blocks (they quantize weights)."""
    residency = adapter.residency
    prefixes = tuple(prefix + "." for prefix in residency.prefixes)
    shards = _shard_names(fmt, len(prefixes))
    packed = fmt is ExportFormat.packed
    qlinears = dict(quant_linears(model))
    outside_linears = [n for n in qlinears if not n.startswith(prefixes)]
    if outside_linears:
        raise ValueError(f"quantized linears outside the blocks: {outside_linears}")
    block_tensors = _packed_tensors if packed else _plain_block_tensors
    if compressed:
        # compressed-tensors (and pydantic) load only for this format
        from cbq.compressed_writer import BlockCompressor

        weight, act = _shared_specs(qlinears)
        assert weight is not None and act is not None
        compressor = BlockCompressor(_meta_copy(model), list(qlinears), weight, act)

        def block_tensors(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
            plain = _plain_copy(block)
            return compressor.block_tensors(plain, dict(quant_linears(block)), prefix)

    outside, tied = _untied(
        {k: t for k, t in model.state_dict().items() if not k.startswith(prefixes)}
    )
    if packed:
        meta["tied"] = tied
    _save(outside, staging / shards[0], {"cbq": fmt.value})
    weight_map = dict.fromkeys(outside, shards[0])
    for index, (prefix, block) in enumerate(zip(prefixes, adapter.blocks(), strict=True)):
        residency.acquire(index)
        try:
            tensors = block_tensors(block, prefix)
            _save(tensors, staging / shards[index + 1], {"cbq": fmt.value})
            block_qlinears = {prefix + name: q for name, q in quant_linears(block)}
            meta["static_activation_scales"].update(static_scales(block_qlinears))
        finally:
            residency.evict(index)
        weight_map.update(dict.fromkeys(tensors, shards[index + 1]))
    if packed:
        meta["shards"] = shards
    else:
        index_file = {"metadata": {"format": "pt"}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    _save_configs(model, staging)
    if compressed:
        meta["compression_format"] = compressor.finish(staging)


def _plain_block_tensors(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: t for key, t in plain_state(block).items()}


def _plain_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block`` with plain linears holding the quantized weights."""
    plain = copy.deepcopy(block)
    unwrap_block(plain)
    plain.load_state_dict(plain_state(block))
    return plain


def _save_configs(model: PreTrainedModel, directory: Path) -> None:
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def _shard_names(fmt: ExportFormat, n_blocks: int) -> list[str]:
    """The outside shard, then one shard per block."""
    total = n_blocks + 1
    if fmt is ExportFormat.packed:
        stem = PACKED_FILE.removesuffix(".safetensors")
        return [PACKED_FILE] + [f"{stem}-block{i:05d}.safetensors" for i in range(n_blocks)]
    return [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]


def _untied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        identity = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
        if tensor.is_meta:  # a lazy model's block on disk (unquantized_size): no storage
            identity = (key,)
        if identity in seen:
            tied[key] = seen[identity]
        else:
            seen[identity] = key
            kept[key] = tensor
    return kept, tied


def _packed_linear(name: str, qlinear: QuantLinear) -> dict[str, torch.Tensor]:
    quantizer, act = qlinear.weight_quantizer, qlinear.act_quantizer
    tensors = {} if qlinear.bias is None else {f"{name}.bias": qlinear.bias}
    weight = qlinear.quantized_weight().detach()
    bits = quantizer.spec.bits
    if quantizer.spec.enabled:
        zeros = quantizer.zero.detach().round()
        if bool((zeros < 0).any() or (zeros > quantizer.spec.qmax).any()):
            raise ValueError(f"{name}: zero points outside [0, {quantizer.spec.qmax}]")
        tensors[f"{name}.qweight"] = pack_bits(_codes(name, qlinear, weight), bits)
        tensors[f"{name}.scales"] = quantizer.scale.detach()
        tensors[f"{name}.qzeros"] = pack_bits(zeros, bits)
    else:
        tensors[f"{name}.weight"] = weight
    if act.needs_calibration:
        if not act.calibrated:
            raise ValueError(f"{name}: its static activation quantizer was never calibrated")
        tensors[f"{name}.act_scale"] = act.scale.detach()
        tensors[f"{name}.act_zero"] = act.zero.detach()
    return tensors


def load_packed(directory: str | Path, device: str = "cpu") -> tuple[PreTrainedModel, Any]:
    """Rebuild a ``packed`` export: the model (eval mode, ``QuantLinear`` modules with
    materialized weights and calibrated activation quantizers) and its tokenizer."""
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    if meta["format"] != ExportFormat.packed.value:
        raise ValueError(
            f"{directory} is a {meta['format']} export; load it with "
            "AutoModelForCausalLM.from_pretrained"
        )
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_config(
        config,
        dtype=getattr(torch, meta["dtype"]),
        attn_implementation=attn_implementation_for(config.model_type),
    )
    names = meta["quantized_linears"]
    if names:
        wrap_block(model, names, _spec_from(meta["weights"]), _spec_from(meta["activations"]))
    tensors = {}
    for shard in meta.get("shards", [PACKED_FILE]):
        tensors.update(load_file(str(directory / shard)))
    for name in names:
        _load_linear(name, model.get_submodule(name), tensors)
    _load_plain(model, tensors, meta["tied"], names)
    if (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def _load_linear(name: str, qlinear: QuantLinear, tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``qlinear`` from (and remove) its packed tensors."""
    quantizer, linear = qlinear.weight_quantizer, qlinear.linear
    if f"{name}.bias" in tensors:
        linear.bias.copy_(tensors.pop(f"{name}.bias"))
    if quantizer.spec.enabled:
        scale = tensors.pop(f"{name}.scales")
        zeros = unpack_bits(tensors.pop(f"{name}.qzeros"), quantizer.spec.bits, scale.numel())
        quantizer.scale.copy_(scale)
        quantizer.zero.copy_(zeros.reshape(scale.shape))
        codes = unpack_bits(
            tensors.pop(f"{name}.qweight"), quantizer.spec.bits, linear.weight.numel()
        )
        weight = dequantize(quantizer, codes.reshape(linear.weight.shape), linear.weight.dtype)
        linear.weight.copy_(weight)
    else:
        linear.weight.copy_(tensors.pop(f"{name}.weight"))
    qlinear.weight_materialized = True
    _load_act(qlinear.act_quantizer, name, tensors)


def _load_act(act: ActQuantizer, name: str, tensors: dict[str, torch.Tensor]) -> None:
    if not act.needs_calibration:
        return
    act.scale.copy_(tensors.pop(f"{name}.act_scale"))
    act.zero.copy_(tensors.pop(f"{name}.act_zero"))
    act.calibrated = True


def _load_plain(
    model: nn.Module, tensors: dict[str, torch.Tensor], tied: dict[str, str], names: list[str]
) -> None:
    """Load the remaining tensors; everything not under a quantized linear must be there."""
    state = {**tensors, **{alias: tensors[stored] for alias, stored in tied.items()}}
    missing, unexpected = model.load_state_dict(state, strict=False)
    quantized = set(names)
    missing = [key for key in missing if _owner(key, quantized)[0] is None]
    if missing or unexpected:
        raise ValueError(
            f"packed export does not match the model: missing {missing}, unexpected {unexpected}"
        )


def unquantized_size(model: nn.Module) -> int:
    """Bytes of the model's tensors as an unquantized checkpoint stores them."""
    qlinears = dict(quant_linears(model))
    state = {key: t for key, t in model.state_dict().items() if _owner(key, qlinears)[0] is None}
    for name, qlinear in qlinears.items():
        state.update({f"{name}.{key}": t for key, t in qlinear.linear.state_dict().items()})
    tensors, _ = _untied(state)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def directory_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A scratch directory that replaces ``target`` when the block succeeds."""
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_replaceable(target: Path) -> None:
    """Only a missing or empty directory, or an earlier export, may be replaced."""
    if not target.exists() or (target / META_FILE).is_file():
        return
    if target.is_file() or any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a cbq export; choose another directory")

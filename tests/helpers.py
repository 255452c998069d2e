"""Helpers shared by the tests: random token ids, blockwise logits and their error against a
reference, RTN references, a method run on a copy of a model, Hydra overrides for runs on a
saved tiny model, a tiny model with a planted massive channel. Import them as
``from helpers import ...`` (``tests`` is on the path)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from cbq.config import Config, QuantConfig
from cbq.methods import RunContext
from cbq.methods.rtn import RoundToNearest, RTNConfig
from cbq.models import ModelAdapter, ScaleGroup, adapter_for, tiny_model
from cbq.quant import QuantLinear, wrap_block

CPU = torch.device("cpu")


def tokens(n: int, seed: int, seqlen: int = 32, vocab: int = 512) -> torch.Tensor:
    """``n`` sequences of ``seqlen`` random token ids below ``vocab``, from their own seed."""
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits, computed block by block through its adapter."""
    with torch.no_grad():
        return adapter_for(model).forward_blocks(ids)


def logits_error(model: nn.Module, reference: nn.Module, ids: torch.Tensor) -> float:
    """Mean squared difference of the two models' logits on ``ids``."""
    return (logits(model, ids) - logits(reference, ids)).pow(2).mean().item()


def rtn_model(model: nn.Module, quant: QuantConfig) -> nn.Module:
    """A copy with every block's linears wrapped and their min-max RTN weights materialized
    (no calibration: activation quantizers stay uncalibrated)."""
    rtn = copy.deepcopy(model)
    adapter = adapter_for(rtn)
    for block in adapter.blocks():
        for qlinear in wrap_block(
            block, adapter.linear_names(), quant.weight_spec(), quant.act_spec()
        ).values():
            qlinear.materialize()
    return rtn


def quantize_copy(
    method_cls, cfg, quant: QuantConfig, fp: nn.Module, calib: torch.Tensor, device=CPU
) -> tuple[nn.Module, dict]:
    """A copy of ``fp`` quantized by ``method_cls(cfg)`` on ``calib``, and the method's stats."""
    model = copy.deepcopy(fp)
    method = method_cls(cfg, Config(quant=quant))
    stats = method.quantize(adapter_for(model), calib, RunContext(device, Path()))
    return model, stats


def rtn_method_model(model: nn.Module, quant: QuantConfig, calib: torch.Tensor) -> nn.Module:
    """``method=rtn``: min-max weights, and static activation ranges from the calibration."""
    return quantize_copy(RoundToNearest, RTNConfig(), quant, model, calib)[0]


def assert_on_grid(qlinear: QuantLinear) -> None:
    """The linear's weight is materialized and on its quantizer's grid."""
    weight = qlinear.linear.weight.detach()
    assert qlinear.weight_materialized
    assert torch.equal(qlinear.weight_quantizer(weight), weight)


def run_overrides(
    model_dir: Path,
    corpus: Path,
    *extra: str,
    max_eval_windows: int = 8,
    logger: str = "disabled",
) -> list[str]:
    """Hydra overrides for a short run on a saved tiny model, ``corpus`` for calibration and
    evaluation, then ``extra``."""
    return [
        "model.name=tiny",
        f"model.path={model_dir}",
        f"data.calib={corpus}",
        f"data.eval=[{corpus}]",
        "data.n_samples=4",
        "data.seqlen=32",
        f"data.max_eval_windows={max_eval_windows}",
        f"logger={logger}",
        *extra,
    ]


# 4-bit weights per channel, 4-bit dynamic per-token activations (the w4a4 preset).
W4A4 = QuantConfig(name="w4a4", w_bits=4, a_bits=4, a_granularity="per_token", a_dynamic=True)

PLANTED = 5  # channel of the block-0 attention-input norm made 50x larger


def planted(family: str) -> tuple[nn.Module, ModelAdapter]:
    """A tiny model whose block-0 ``attn_in`` norm makes channel PLANTED ~50x the others."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    norm = attn_in(adapter).producer
    with torch.no_grad():
        if family == "gemma3":  # x_hat * (1 + w)
            norm.weight[PLANTED] = (1.0 + norm.weight[PLANTED]) * 50.0 - 1.0
        else:
            norm.weight[PLANTED] *= 50.0
        if getattr(norm, "bias", None) is not None:
            norm.bias[PLANTED] *= 50.0
    return model, adapter


def attn_in(adapter: ModelAdapter) -> ScaleGroup:
    return next(g for g in adapter.scale_groups(adapter.blocks()[0]) if g.name == "attn_in")


def assert_export_recorded(record: dict, run_dir: Path, fmt: str) -> Path:
    """The run's record names the export's format, path and size; returns the export dir."""
    from cbq.export import directory_size

    stats, exported = record["stats"], run_dir / "quantized"
    assert stats["export/format"] == fmt
    assert stats["export/path"] == str(exported)
    assert stats["export/size_bytes"] == directory_size(exported) > 0
    return exported

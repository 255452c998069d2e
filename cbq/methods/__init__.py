"""Quantization methods, one module each, behind ``method=<name>``."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cbq.config import Config
from cbq.methods.autoround import AutoRound
from cbq.methods.awq import AWQ
from cbq.methods.base import MethodConfig, QuantMethod, RunContext
from cbq.methods.cbq import CrossBlockQuantization
from cbq.methods.fp import FullPrecision
from cbq.methods.gptq import GPTQ
from cbq.methods.omniquant import OmniQuant
from cbq.methods.rtn import RoundToNearest
from cbq.methods.smoothquant import OutlierSuppressionPlus, SmoothQuant

METHODS: dict[str, type[QuantMethod]] = {
    m.name: m
    for m in (
        FullPrecision,
        RoundToNearest,
        GPTQ,
        SmoothQuant,
        OutlierSuppressionPlus,
        AWQ,
        OmniQuant,
        AutoRound,
        CrossBlockQuantization,
    )
}


def _method_class(name: Any) -> type[QuantMethod]:
    if name not in METHODS:
        raise ValueError(f"method.name: '{name}' is not allowed; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def method_config(raw: Any) -> MethodConfig:
    """``raw`` (the ``method`` node) checked against the method's own dataclass."""
    name = raw.get("name") if hasattr(raw, "get") else None
    schema = OmegaConf.structured(_method_class(name).config_class)
    merged = OmegaConf.merge(schema, OmegaConf.create(dict(raw)))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def method_problems(raw: Any) -> list[str]:
    try:
        method_config(raw)
    except OmegaConfBaseException as error:  # a wrong type or enum value
        key = getattr(error, "full_key", None) or getattr(error, "key", "")
        return [f"method.{key}: {error.msg if hasattr(error, 'msg') else error}".split("\n")[0]]
    except ValueError as error:  # a method's own checks: one problem a line
        return str(error).split("\n")
    return []


def build_method(run_cfg: Config) -> QuantMethod:
    cfg = method_config(run_cfg.method)
    return METHODS[cfg.name](cfg, run_cfg)


__all__ = ["METHODS", "MethodConfig", "QuantMethod", "RunContext", "build_method", "method_config"]

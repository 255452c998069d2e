"""Block reconstruction distances: L2, KL over the hidden dimension, and their terms.

``D(a, b) = w_l2 * mean((a - b)^2) + w_kl * KL(softmax(b) || softmax(a))``, where ``a`` is the
quantized output, ``b`` the FP target, the softmax runs over the hidden dimension of each
token and the KL is averaged over tokens. The L2 term is a mean over elements (as in
OmniQuant's block MSE), so its weight does not depend on the hidden size. With
``l2_relative`` it is divided by ``mean(b^2)``, which makes it independent of the target's
scale as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch.nn import functional


class LossKind(StrEnum):
    l2 = "l2"
    kl = "kl"
    l2_kl = "l2_kl"


def l2_distance(output: torch.Tensor, target: torch.Tensor, relative: bool = False) -> torch.Tensor:
    target = target.float()
    error = functional.mse_loss(output.float(), target)
    return error / target.square().mean().clamp_min(1e-12) if relative else error


def kl_distance(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(output)) per token, averaged over tokens."""
    hidden = output.shape[-1]
    log_q = functional.log_softmax(output.float().reshape(-1, hidden), dim=-1)
    log_p = functional.log_softmax(target.float().reshape(-1, hidden), dim=-1)
    return functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def reconstruction_terms(
    output: torch.Tensor,
    target: torch.Tensor,
    kind: LossKind,
    l2_weight: float = 1.0,
    kl_weight: float = 1.0,
    l2_relative: bool = False,
) -> dict[str, torch.Tensor]:
    """The weighted terms of ``D`` that ``kind`` uses, by name (``l2``, ``kl``)."""
    kind = LossKind(kind)
    terms = {}
    if kind in (LossKind.l2, LossKind.l2_kl):
        terms["l2"] = l2_weight * l2_distance(output, target, l2_relative)
    if kind in (LossKind.kl, LossKind.l2_kl):
        terms["kl"] = kl_weight * kl_distance(output, target)
    return terms


def check_finite(
    loss_value: float, where: str, advice: str, before_raise: Callable[[], object] | None = None
) -> None:
    """Raise ``FloatingPointError("{where}: loss is {loss_value}. {advice}")`` when the loss is
    NaN or infinite, calling ``before_raise`` (say, a progress bar's ``close``) first."""
    if math.isfinite(loss_value):
        return
    if before_raise is not None:
        before_raise()
    raise FloatingPointError(f"{where}: loss is {loss_value}. {advice}")


@dataclass
class LossConfig:
    kind: LossKind = LossKind.l2_kl
    # Also match the FP blocks fed with the quantized stream (homologous reconstruction).
    homologous: bool = True
    l2_weight: float = 1.0
    kl_weight: float = 1.0
    # Divide the L2 term by the target's mean square, so that every window's loss is on the
    # same scale whatever the magnitude of the residual stream (not in the paper).
    l2_relative: bool = False

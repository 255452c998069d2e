"""Learned rounding: AdaRound (full rank) and CBQ's LoRA-Rounding (low rank).

The weight is quantized as ``s * (clamp(floor(W/s) + h(V) + z, 0, 2^b-1) - z)`` with the
rectified sigmoid ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` and

    V = V0(W/s) + D,   D = A1 @ A2 (LoRA-Rounding, rank r)  or  D a full matrix (AdaRound).

``V0`` is round-to-nearest expressed as a rounding variable: ``+INIT_MAGNITUDE`` where
``frac(W/s) >= 0.5``, ``-INIT_MAGNITUDE`` elsewhere. It is recomputed from the current step
size at every forward, so when CBQ learns ``s`` and the rounding together, the learned part
``D`` is always a deviation from round-to-nearest at the current ``s`` (a fixed ``V0`` would
turn each grid crossing of ``W/s`` into a one-step error).

At the start ``D = 0`` (``A2`` starts at zero): hardening (``h >= 0.5``, i.e. ``V >= 0``)
gives exactly RTN and the soft offsets (0.957 / 0.043) lie within 0.05 of a step of it.
``V0`` sits inside the rectified sigmoid's slope on purpose: at the clamp the gradient would
be zero and the variables could never move.
"""

from __future__ import annotations

import torch
from torch import nn

ZETA, GAMMA = 1.1, -0.1
INIT_MAGNITUDE = 2.0


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of ``1 - |2h - 1|^beta``: 0 when every offset is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).mean()


def nearest_variable(scaled: torch.Tensor) -> torch.Tensor:
    """``V0``: the rounding variable that encodes round-to-nearest of ``scaled = W/s``."""
    scaled = scaled.detach()
    round_up = (scaled - scaled.floor()) >= 0.5
    return torch.where(round_up, INIT_MAGNITUDE, -INIT_MAGNITUDE).to(scaled.dtype)


class SoftRounding(nn.Module):
    """Rounding offsets in [0, 1] for ``W/s``; soft while learning, {0, 1} once hardened."""

    def __init__(self) -> None:
        super().__init__()
        self.hard = False
        self._last_soft: torch.Tensor | None = None

    def deviation(self) -> torch.Tensor:
        """``D``, the learned deviation from round-to-nearest."""
        raise NotImplementedError

    def forward(self, scaled: torch.Tensor) -> torch.Tensor:
        variable = nearest_variable(scaled) + self.deviation()
        if self.hard:
            return (variable >= 0).to(scaled.dtype)
        self._last_soft = rectified_sigmoid(variable)
        return self._last_soft

    def regularizer(self, beta: float) -> torch.Tensor:
        """Regulariser on the offsets of the latest forward pass."""
        if self._last_soft is None:
            raise RuntimeError("regularizer() needs a forward pass first")
        return rounding_regularizer(self._last_soft, beta)

    def harden(self) -> None:
        self.hard = True
        self._last_soft = None

    def get_extra_state(self) -> dict[str, bool]:
        return {"hard": self.hard}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.hard = state["hard"]


class AdaRound(SoftRounding):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.d = nn.Parameter(torch.zeros_like(weight))

    def deviation(self) -> torch.Tensor:
        return self.d


class LoRARounding(SoftRounding):
    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        rows, cols = weight.shape
        rank = min(rank, rows, cols)
        init = torch.randn(rows, rank, generator=generator, dtype=weight.dtype) / rank**0.5
        self.a1 = nn.Parameter(init.to(weight.device))
        self.a2 = nn.Parameter(torch.zeros(rank, cols, dtype=weight.dtype, device=weight.device))

    def deviation(self) -> torch.Tensor:
        return self.a1 @ self.a2


def learnable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

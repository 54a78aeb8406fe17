"""Small pieces shared by backbones and recipes."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn


def mae_init_(modules: Iterable[nn.Module]) -> None:
    """MAE's initialisation: Xavier-uniform Linear weights, zero biases, LayerNorm weight 1 and bias 0."""
    for m in modules:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def fp32_region(device: torch.device):
    """Autocast off on ``device`` (the caller computes in fp32 at least); a no-op on the meta device, where
    ``--dry-run`` traces shapes and autocast does not exist."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)

"""Small pieces shared by backbones and recipes."""

from __future__ import annotations

from typing import Iterable

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

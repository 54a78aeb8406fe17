"""Name → constructor registries for backbones and pretext tasks (timm-style decorators).

``@BACKBONES.register("vit3d_base_p16")`` on a function returning an ``nn.Module``;
``BACKBONES.build("vit3d_base_p16", in_chans=1)``. An unknown name fails with the closest known names.
"""

from __future__ import annotations

import difflib
from typing import Callable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str | None = None):
        def deco(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._items and self._items[key] is not fn:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._items))})")
        return self._items[name]

    def build(self, name: str, *args, **kwargs):
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def build_decoder(backbone, name: str, feature_strides, out_channels: int, kwargs: dict):
    """A recipe's decoder ``name`` over ``backbone``'s features. A backbone that brings its own decoder (``native_decoder``,
    e.g. nnU-Net's) takes that one, built from the backbone's ``decoder_kwargs`` (the recipe's ``kwargs`` on top), so
    that the export is the whole network its framework builds."""
    native = getattr(backbone, "native_decoder", None)
    if native and name != native:
        from .config import ConfigError

        raise ConfigError(f"task.decoder={name!r}: this backbone takes its own decoder, task.decoder={native} (so that the "
                          "export is the whole network its framework builds)")
    kw = {**(getattr(backbone, "decoder_kwargs", {}) if native else {}), **kwargs}
    return DECODERS.build(name, list(backbone.feature_channels), list(feature_strides), out_channels, **kw)


BACKBONES = Registry("backbone")
TASKS = Registry("pretext task")
DECODERS = Registry("decoder")

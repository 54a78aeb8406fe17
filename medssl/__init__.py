"""medssl: self-supervised pretraining for 3D CT and MRI.

One import name for the four parts, each a top-level folder of the repository:
``medssl.shards`` (datasets → webdataset shards → crops), ``medssl.pretrain`` (the DeepSpeed loop,
backbones, exports), ``medssl.recipes`` (the pretext tasks) and ``medssl.finetune`` (segmentation on few
labels). An installed wheel places them under ``medssl/``; an editable install maps them to the folders.
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# Imported straight from a checkout (its folder on sys.path, no install, or a wheel installed elsewhere):
# the parts are this folder's siblings, so the package also searches the checkout root for them.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "pretrain")) and \
        _os.path.isfile(_os.path.join(_root, "pretrain", "__init__.py")):
    __path__.append(_root)  # noqa: F821 — the package's own search path

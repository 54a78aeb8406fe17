"""Backbones (contract 2 in docs/DESIGN.md), built by name: ``build_backbone("vit3d_base_p16", img_size=96)``.

Importing this package imports every backbone module, so that each registers its names in
:data:`pretrain.registry.BACKBONES`. A new backbone module is added to the imports below.
"""

from ..registry import BACKBONES
from . import hymamba3d  # noqa: F401  (registers hymamba3d*)
from . import nnunet  # noqa: F401  (registers nnunet_resenc, nnunet_plain and the nnunet decoder)
from . import resenc3d  # noqa: F401  (registers resenc3d*, decoders fmunet and unet3d)
from . import vit3d  # noqa: F401  (registers vit3d_*)
from .vit3d import ViT3D, sincos_pos_embed_3d

build_backbone = BACKBONES.build

__all__ = ["BACKBONES", "ViT3D", "build_backbone", "sincos_pos_embed_3d"]

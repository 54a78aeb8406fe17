"""medssl pretrain: config, registries, backbones, the DeepSpeed training loop and exports (in progress).

Today it holds the ``medssl`` console script (:mod:`pretrain.cli`).
"""

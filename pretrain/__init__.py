"""medssl pretrain: config, registries, backbones, the one DeepSpeed training loop, checkpoints and exports."""

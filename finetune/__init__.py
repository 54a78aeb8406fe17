"""medssl finetune: exports → segmentation networks, Dice against scratch (in progress)."""

"""medssl finetune: exports (or MONAI self-supervised checkpoints) become segmentation networks, trained
on small labelled sets with DeepSpeed and scored against the same network from scratch.

``python -m medssl.finetune --export DIR --data DATASET --out RUN``; ``python -m medssl.finetune report RUN … --out report.md``.
"""

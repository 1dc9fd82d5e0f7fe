"""The training routine on PyTorch Lightning (extra `train`): one LightningModule for every method that returns
member logits (module.py), its callbacks (callbacks.py), resumable checkpoints (checkpointing.py) and the data
order (samplers.py)."""

from lora_ensemble.extras import require

require("train", "lightning", "torchmetrics", "numpy", feature="training (lora_ensemble.lightning)")

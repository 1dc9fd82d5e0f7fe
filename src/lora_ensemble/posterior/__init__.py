"""Posterior members: a Gaussian over each trained member's tensors, and ensembles of M * K draws on the same
frozen backbone.

    swag.py        SWAG moments (running mean, second moment, last `rank` deviations) and draws
    tfb.py         training-free sigma on the A matrices, by binary search on the anchor NLL
    evaluation.py  member logits over batches, per-member NLL, members in chunks (member_chunk_size)
    posterior.py   LoraPosterior: collect / calibrate / sample / member_logits / save_pretrained / from_pretrained

The sampled ensembles are built by `core.twin.ensemble_like` (N members on the frozen tensors of another).
Imports only torch, safetensors and `lora_ensemble.core`, `io`, `losses`.
"""

from lora_ensemble.core.twin import ensemble_like
from lora_ensemble.posterior.posterior import POSTERIOR_METHODS, LoraPosterior
from lora_ensemble.posterior.tfb import TfbCalibration

__all__ = ["POSTERIOR_METHODS", "LoraPosterior", "TfbCalibration", "ensemble_like"]

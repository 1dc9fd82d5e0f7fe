"""lora_ensemble: calibrated uncertainty for pretrained self-attention networks with LoRA-Ensemble.

    from lora_ensemble import LoraEnsemble, LoraEnsembleConfig
    ens = LoraEnsemble(model, LoraEnsembleConfig(num_members=4, r=8, target_modules="qkvo"))
    member_logits = ens(**batch)            # (M, B, C)
"""

from .config import LoraEnsembleConfig
from .ensemble import LoraEnsemble
from .trunk import TrunkCache

__all__ = ["LoraEnsemble", "LoraEnsembleConfig", "TrunkCache"]
__version__ = "0.1.0"

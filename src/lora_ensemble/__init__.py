"""lora_ensemble: calibrated uncertainty for pretrained self-attention networks with LoRA-Ensemble.

    from lora_ensemble import LoraEnsemble, LoraEnsembleConfig
    ens = LoraEnsemble(model, LoraEnsembleConfig(num_members=4, r=8, target_modules="qkvo"))
    member_logits = ens(**batch)            # (M, B, C)

Importing this package needs only torch and safetensors (the library in `core/`, `metrics/`, `methods/`,
`interop/`, `posterior/`); the training routine (`lightning/`) and the application (`app/`) need the extras they name.
"""

from lora_ensemble.core.config import LoraEnsembleConfig
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.core.trunk_cache import TrunkCache
from lora_ensemble.interop.peft import export_peft, from_peft
from lora_ensemble.losses import member_cross_entropy
from lora_ensemble.posterior import LoraPosterior, TfbCalibration

__all__ = ["LoraEnsemble", "LoraEnsembleConfig", "LoraPosterior", "TfbCalibration", "TrunkCache", "export_peft", "from_peft",
           "member_cross_entropy"]
__version__ = "0.1.0"

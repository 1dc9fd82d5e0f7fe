"""Do the members reach different modes? Functions on member logits, tensors and `LoraEnsemble`s (no training):

    function_space   pairwise disagreement / KL / JS / error correlation matrices, the diversity-accuracy plane
                     (Fort et al. 2019), per-class disagreement                  (any method's member logits)
    weight_space     cosine of the members' updates dW_m = s B_m A_m per projection and over the model, by
                     trace identities (no dW formed); effective rank of the stacked updates      (LoraEnsemble)
    connectivity     loss / accuracy along the straight path between members as one rank-2r LoraEnsemble,
                     barriers, the same-member control                                       (LoraEnsemble)
    representations  linear CKA between members' pooled block features, via forward hooks    (LoraEnsemble)
"""

from lora_ensemble.analysis.connectivity import grid, member_pairs, path_curves, path_ensemble
from lora_ensemble.analysis.function_space import (
    disagreement_matrix,
    diversity_accuracy_plane,
    error_correlation_matrix,
    function_space,
    js_matrix,
    kl_matrix,
    per_class_disagreement,
)
from lora_ensemble.analysis.representations import (
    BlockFeatures,
    adapted_blocks,
    cka_matrix,
    linear_cka,
    member_logits_and_features,
    representation_similarity,
)
from lora_ensemble.analysis.weight_space import (
    adapted_layers,
    cosine_from_gram,
    effective_rank,
    update_gram,
    weight_space,
)

__all__ = [
    "BlockFeatures", "adapted_blocks", "adapted_layers", "cka_matrix", "cosine_from_gram", "disagreement_matrix",
    "diversity_accuracy_plane", "effective_rank", "error_correlation_matrix", "function_space", "grid",
    "js_matrix", "kl_matrix", "linear_cka", "member_logits_and_features", "member_pairs", "path_curves",
    "path_ensemble", "per_class_disagreement", "representation_similarity", "update_gram", "weight_space",
]

"""Interoperability: PEFT adapters, Hugging Face Hub checkpoints, causal LMs as classifiers (docs/interop.md)."""

from lora_ensemble.interop.causal_lm import CausalLMChoiceScorer, CausalLMClassifier, choice_log_likelihoods
from lora_ensemble.interop.peft import export_peft, from_peft
from lora_ensemble.interop.peft_files import read_peft_adapter
from lora_ensemble.io import resolve_checkpoint

__all__ = ["CausalLMChoiceScorer", "CausalLMClassifier", "choice_log_likelihoods", "export_peft", "from_peft", "read_peft_adapter",
           "resolve_checkpoint"]

"""Interoperability: PEFT adapters, Hugging Face Hub checkpoints, causal LMs as classifiers (docs/interop.md)."""

from .causal_lm import CausalLMClassifier, choice_log_likelihoods
from .hub import resolve_checkpoint
from .peft import ensemble_from_peft, export_peft
from .peft_files import read_peft_adapter

__all__ = ["CausalLMClassifier", "choice_log_likelihoods", "ensemble_from_peft", "export_peft", "read_peft_adapter",
           "resolve_checkpoint"]

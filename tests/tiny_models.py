"""Tiny randomly initialised models of every supported family, with a matching input batch.

Each factory returns (model, make_batch) where make_batch(batch_size, generator) -> dict of model kwargs
(or a tuple for positional inputs). No downloads: everything is built from configs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

NUM_LABELS = 3
VOCAB = 50


def _text_batch(batch_size: int, g: torch.Generator, seq: int = 6, vocab: int = VOCAB) -> dict:
    ids = torch.randint(1, vocab, (batch_size, seq), generator=g)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    mask[0, -2:] = 0  # one padded sample
    return {"input_ids": ids, "attention_mask": mask}


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, num_labels=NUM_LABELS, max_position_embeddings=32)
    return BertForSequenceClassification(cfg), _text_batch


def roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=VOCAB, num_labels=NUM_LABELS, max_position_embeddings=40, pad_token_id=0)
    return RobertaForSequenceClassification(cfg), _text_batch


def distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB, num_labels=NUM_LABELS,
                           max_position_embeddings=32)
    return DistilBertForSequenceClassification(cfg), _text_batch


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                    patch_size=8, num_labels=NUM_LABELS)
    return ViTForImageClassification(cfg), lambda b, g: {"pixel_values": torch.randn(b, 3, 16, 16, generator=g)}


def ast():
    from transformers import ASTConfig, ASTForAudioClassification

    cfg = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8,
                    frequency_stride=8, time_stride=8, max_length=24, num_mel_bins=16, num_labels=NUM_LABELS)
    return ASTForAudioClassification(cfg), lambda b, g: {"input_values": torch.randn(b, 24, 16, generator=g)}


def llama_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32)
    return LlamaForCausalLM(cfg), _text_batch


def llama_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32, num_labels=NUM_LABELS,
                      pad_token_id=0)
    return LlamaForSequenceClassification(cfg), _text_batch


def gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    return GPT2LMHeadModel(cfg), _text_batch


def timm_vit():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=NUM_LABELS)
    return model, lambda b, g: (torch.randn(b, 3, 32, 32, generator=g),)


def timm_deit():
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=NUM_LABELS)
    return model, lambda b, g: (torch.randn(b, 3, 32, 32, generator=g),)


def timm_swin():
    import timm

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                              window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 4), num_classes=NUM_LABELS)
    return model, lambda b, g: (torch.randn(b, 3, 32, 32, generator=g),)


def torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=NUM_LABELS)
    return model, lambda b, g: (torch.randn(b, 3, 16, 16, generator=g),)


class TinyTransformer(nn.Module):
    """A plain PyTorch classifier with hand-written attention (no library)."""

    def __init__(self, dim: int = 16, depth: int = 2, num_classes: int = NUM_LABELS, in_dim: int = 5):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(dim, dim), "k_proj": nn.Linear(dim, dim), "v_proj": nn.Linear(dim, dim),
                           "o_proj": nn.Linear(dim, dim), "norm": nn.LayerNorm(dim)})
            for _ in range(depth)
        )
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):  # x: (B, T, in_dim)
        h = self.embed(x)
        for blk in self.blocks:
            q, k, v = blk["q_proj"](h), blk["k_proj"](h), blk["v_proj"](h)
            attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
            h = blk["norm"](h + blk["o_proj"](attn @ v))
        return self.fc(h.mean(dim=1))


def plain():
    return TinyTransformer(), lambda b, g: (torch.randn(b, 4, 5, generator=g),)


FAMILIES = {
    "bert": bert, "roberta": roberta, "distilbert": distilbert, "hf_vit": hf_vit, "ast": ast,
    "llama_lm": llama_lm, "llama_cls": llama_cls, "gpt2_lm": gpt2_lm, "timm_vit": timm_vit,
    "timm_deit": timm_deit, "timm_swin": timm_swin, "torchvision_vit": torchvision_vit, "plain": plain,
}


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model, make_batch = FAMILIES[family]()
    return model.eval(), make_batch


def call(model, batch):
    """Call a model (or an ensemble) with a batch from make_batch; returns the prediction tensor."""
    out = model(*batch) if isinstance(batch, tuple) else model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def word_tokenizer(words: list[str]):
    """A real Hugging Face fast tokenizer over `words` (whitespace split; '[UNK]', '[PAD]' and '<s>' among them)
    that puts <s> before every text, as the Llama tokenizers put BOS: prompts of known token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>")


def randomize_lora_B(ens):
    """Members that differ: every lora_B drawn N(0, 0.3^2) from one seeded generator (B = 0 at init makes every
    member the frozen model); returns the ensemble in eval mode."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sorted(ens.member_parameters().items()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ens.eval()

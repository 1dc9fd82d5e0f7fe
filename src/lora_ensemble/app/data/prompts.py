"""Prompts for decoder LLMs: a template per dataset, the classes listed as lettered choices, the article
truncated to fit and the answer cue always kept.

A template is a string with one `{text}` (the input) and optionally `{choices}` (one line per class,
"A. business", "B. politics", ...); it ends with the answer cue. The answer of class c is " <letter c>"
(`PromptTemplate.answers`), the token a verbalizer reads after the cue:

    Article: {text}

    Which topic is this article about?
    {choices}
    Answer:

`PromptCollator` tokenizes every part once: input_ids = [BOS] + prefix + text[:budget] + suffix, where the
prefix is the template before `{text}`, the suffix everything after it (choices and cue) and
budget = max_length - |BOS| - |prefix| - |suffix| tokens, so only the text is ever cut. Rows are padded on
the right (the last real token, the cue's, is at `attention_mask.sum(1) - 1`).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import torch

LETTERS = string.ascii_uppercase
# the template of each dataset (`data.prompt` replaces it)
PROMPTS = {
    "bbc_news": "Article: {text}\n\nWhich topic is this article about?\n{choices}\nAnswer:",
    "sst2": "Review: {text}\n\nIs the sentiment of this review negative or positive?\n{choices}\nAnswer:",
}
FIELDS = ("text", "choices")


def prompt_for(dataset: str | None, prompt: str | None) -> str:
    """`prompt` when given, else the template of `dataset`; ValueError when there is neither."""
    if prompt is not None:
        return prompt
    if dataset in PROMPTS:
        return PROMPTS[dataset]
    raise ValueError(f"dataset {dataset!r} has no prompt template (templates exist for {sorted(PROMPTS)}); set "
                     "data.prompt to a template with {text} and {choices}, e.g. "
                     + repr(PROMPTS["bbc_news"]))


class PromptTemplate:
    """`template` with `{text}` once and optionally `{choices}`, for classes `class_names` (lettered A, B, ...)."""

    def __init__(self, template: str, class_names: Sequence[str]):
        if not isinstance(template, str):
            raise TypeError(f"a prompt template is a string, got {type(template).__name__}")
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        unknown = sorted(set(names) - set(FIELDS))
        if unknown or names.count("text") != 1 or names.count("choices") > 1:
            raise ValueError(f"the template {template!r} must hold {{text}} exactly once and {{choices}} at most "
                             f"once, and no other field (found {names})")
        if len(class_names) > len(LETTERS):
            raise ValueError(f"{len(class_names)} classes, but letters exist for {len(LETTERS)}")
        self.template, self.class_names = template, list(class_names)
        self.letters = list(LETTERS[: len(class_names)])
        choices = "\n".join(f"{letter}. {name}" for letter, name in zip(self.letters, self.class_names))
        before, after = template.split("{text}")
        if "{choices}" in before:
            raise ValueError("{choices} must come after {text}, next to the answer cue")
        self.prefix, self.suffix = before.replace("{{", "{").replace("}}", "}"), after.format(choices=choices)
        if not self.suffix.strip():
            raise ValueError(f"the template {template!r} ends with {{text}}: it needs an answer cue after it "
                             "(e.g. '\\nAnswer:')")

    @property
    def answers(self) -> list[str]:
        """The answer string of every class: " A", " B", ..."""
        return [" " + letter for letter in self.letters]

    def render(self, text: str) -> str:
        """The whole prompt for `text`, untruncated."""
        return self.prefix + text + self.suffix


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text of its own accord (e.g. [BOS]; [] for SmolLM2); what it would
    put after it (an EOS) is left out: the prompt ends with the answer cue."""
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start]
    return []


class PromptCollator:
    """A list of `(text, label)` -> `input_ids, attention_mask: (B, L)` (right-padded, L <= max_length) and
    `labels: (B,)`, each row [BOS] + prefix + text truncated to the budget + suffix (see the module docstring)."""

    def __init__(self, tokenizer: Any, template: PromptTemplate, max_length: int):
        self.tokenizer, self.template, self.max_length = tokenizer, template, int(max_length)
        self.bos = leading_special_tokens(tokenizer)
        # trailing spaces of the prefix go with the text ("Article:" + " The ..."), as a BPE tokenizer splits them
        stripped = template.prefix.rstrip(" ")
        self.text_lead = template.prefix[len(stripped):]
        self.prefix_ids = self._ids(stripped)
        self.suffix_ids = self._ids(template.suffix)
        fixed = len(self.bos) + len(self.prefix_ids) + len(self.suffix_ids)
        self.budget = self.max_length - fixed
        if self.budget < 1:
            raise ValueError(f"the prompt template takes {fixed} tokens without the text; max_length={max_length} "
                             f"leaves no room for it (use max_length > {fixed})")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt: [BOS] + prefix + text[:budget] + suffix."""
        text_ids = self._ids(self.text_lead + text)[: self.budget]
        return self.bos + self.prefix_ids + text_ids + self.suffix_ids

    def __call__(self, batch: Sequence[tuple[Any, int]]) -> dict[str, torch.Tensor]:
        texts = [text for text, _ in batch]
        if not all(isinstance(text, str) for text in texts):
            kinds = sorted({type(text).__name__ for text in texts})
            raise TypeError(f"PromptCollator expects str inputs, got {kinds}; is this a text dataset?")
        rows = [self.encode(text) for text in texts]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        labels = torch.as_tensor([int(label) for _, label in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

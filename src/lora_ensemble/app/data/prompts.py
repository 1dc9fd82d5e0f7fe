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

Multiple choice (`data.kind: multiple_choice`): an item is `({"question": str, "choices": [str, ...]}, answer)`,
or a plain `(text, label)` whose choices are the class names. The template has `{text}` (the question) and no
`{choices}`, and ends with the cue the choices continue (`MC_PROMPTS`, e.g. "Article: {text}\nTopic:").
`ChoiceCollator` packs one row per question,

    input_ids   = [BOS] + prefix + question[:budget] + suffix | " " + choice 0 | ... | " " + choice K-1 | pad
    segment_ids =   0     0        0                   0      |  1             | ... |  K                 | -1

with budget = max_length - |BOS| - |prefix| - |suffix| - max_k |choice k| tokens: the question alone is cut,
never a choice or the cue, and the longest `question + one choice` is at most max_length tokens (the positions
a choice is scored at; see `CausalLMChoiceScorer`).
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
# multiple choice: the template of each dataset, its cue continued by " <choice>" (`data.prompt` replaces it)
MC_PROMPTS = {
    "bbc_news": "Article: {text}\nTopic:",
    "sst2": "Review: {text}\nSentiment:",
    "jsonl_multiple_choice": "Question: {text}\nAnswer:",
}


def _template_for(dataset: str | None, prompt: str | None, templates: dict[str, str], kind: str, needs: str) -> str:
    """`prompt` when given, else `templates[dataset]`; ValueError (what the template `needs`) when there is neither."""
    if prompt is not None:
        return prompt
    if dataset in templates:
        return templates[dataset]
    example = next(iter(templates.values()))
    raise ValueError(f"dataset {dataset!r} has no {kind} (templates exist for {sorted(templates)}); set "
                     f"data.prompt to a template with {needs}, e.g. {example!r}")


def prompt_for(dataset: str | None, prompt: str | None) -> str:
    """`prompt` when given, else the template of `dataset`; ValueError when there is neither."""
    return _template_for(dataset, prompt, PROMPTS, "prompt template", "{text} and {choices}")


def choice_prompt_for(dataset: str | None, prompt: str | None) -> str:
    """`prompt` when given, else the multiple-choice template of `dataset`; ValueError when there is neither."""
    return _template_for(dataset, prompt, MC_PROMPTS, "multiple-choice template",
                         "{text} and a cue the choices continue")


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


def pad_token_id(tokenizer: Any) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its EOS token; ValueError when it has neither."""
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return pad


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids of `text` without special tokens ([] for the empty string)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


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
        self.pad_id = pad_token_id(tokenizer)

    def _ids(self, text: str) -> list[int]:
        return token_ids(self.tokenizer, text)

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt: [BOS] + prefix + text[:budget] + suffix."""
        text_ids = self._ids(self.text_lead + text)[: self.budget]
        return self.bos + self.prefix_ids + text_ids + self.suffix_ids

    def __call__(self, batch: Sequence[tuple[Any, int]]) -> dict[str, torch.Tensor]:
        texts = [text for text, _ in batch]
        if not all(isinstance(text, str) for text in texts):
            if any(isinstance(text, dict) and "choices" in text for text in texts):
                raise TypeError("PromptCollator got multiple-choice items (question, choices); set data.kind: "
                                "multiple_choice for this dataset")
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


class ChoiceCollator:
    """Multiple-choice items -> packed `input_ids, segment_ids: (B, L)` and `labels: (B,)` (the answers), one row
    per question (see the module docstring). `choices` are the choices of plain `(text, label)` items (the class
    names of a classification dataset); an item `({"question", "choices"}, answer)` brings its own. Every row has
    exactly `num_choices` choices."""

    def __init__(self, tokenizer: Any, template: str, max_length: int, num_choices: int,
                 choices: Sequence[str] | None = None):
        if "{choices}" in template:
            raise ValueError(f"the multiple-choice template {template!r} lists no {{choices}}: each choice is scored "
                             "as the continuation of the template's cue")
        self.template = PromptTemplate(template, [])
        self.tokenizer, self.max_length, self.num_choices = tokenizer, int(max_length), int(num_choices)
        self.bos = leading_special_tokens(tokenizer)
        stripped = self.template.prefix.rstrip(" ")
        self.text_lead = self.template.prefix[len(stripped):]
        self.prefix_ids, self.suffix_ids = self._ids(stripped), self._ids(self.template.suffix)
        self.fixed = len(self.bos) + len(self.prefix_ids) + len(self.suffix_ids)
        self.choices = None if choices is None else self._check_choices(list(choices), "the class names")
        self._choice_ids: dict[str, list[int]] = {}
        if self.choices is not None:
            self.budget_for(self.choices)  # a choice too long for max_length is an error now, not at the first batch
        self.pad_id = pad_token_id(tokenizer)

    def _ids(self, text: str) -> list[int]:
        return token_ids(self.tokenizer, text)

    def _check_choices(self, choices: list, where: str) -> list[str]:
        if len(choices) != self.num_choices:
            raise ValueError(f"{where} has {len(choices)} choices, but this dataset has {self.num_choices} (a "
                             "multiple-choice dataset has one fixed number of choices per question)")
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError(f"{where}: every choice must be a non-empty string, got {choices}")
        return choices

    def choice_ids(self, choice: str) -> list[int]:
        """The tokens of `choice` as the continuation of the cue: " " + choice."""
        if choice not in self._choice_ids:
            self._choice_ids[choice] = self._ids(" " + choice.strip())
        return self._choice_ids[choice]

    def budget_for(self, choices: Sequence[str]) -> int:
        """Question tokens that fit: max_length - fixed prompt tokens - the longest choice's tokens."""
        longest = max(choices, key=lambda c: len(self.choice_ids(c)))
        budget = self.max_length - self.fixed - len(self.choice_ids(longest))
        if budget < 1:
            raise ValueError(f"the prompt takes {self.fixed} tokens without the question and the choice "
                             f"{longest!r} {len(self.choice_ids(longest))}; max_length={self.max_length} leaves no "
                             "room for the question")
        return budget

    def encode(self, question: str, choices: Sequence[str]) -> tuple[list[int], list[int]]:
        """(token ids, segment ids) of one packed row."""
        question_ids = self._ids(self.text_lead + question)[: self.budget_for(choices)]
        ids = self.bos + self.prefix_ids + question_ids + self.suffix_ids
        segments = [0] * len(ids)
        for k, choice in enumerate(choices):
            piece = self.choice_ids(choice)
            ids += piece
            segments += [k + 1] * len(piece)
        return ids, segments

    def _item(self, raw: Any, i: int) -> tuple[str, list[str]]:
        if isinstance(raw, str):
            if self.choices is None:
                raise TypeError("ChoiceCollator got a plain text item but has no fixed choices; give items "
                                "{'question', 'choices'} or the class names as choices")
            return raw, self.choices
        if isinstance(raw, dict) and isinstance(raw.get("question"), str) and isinstance(raw.get("choices"), list):
            return raw["question"], self._check_choices(raw["choices"], f"item {i} of the batch")
        raise TypeError(f"ChoiceCollator expects items {{'question': str, 'choices': [str, ...]}} or str, got "
                        f"{type(raw).__name__}; is this a text dataset?")

    def __call__(self, batch: Sequence[tuple[Any, int]]) -> dict[str, torch.Tensor]:
        rows = [self.encode(*self._item(raw, i)) for i, (raw, _) in enumerate(batch)]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        segment_ids = torch.full((len(rows), length), -1, dtype=torch.long)
        for i, (ids, segments) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            segment_ids[i, : len(ids)] = torch.tensor(segments, dtype=torch.long)
        labels = torch.as_tensor([int(label) for _, label in batch], dtype=torch.long)
        return {"input_ids": input_ids, "segment_ids": segment_ids, "labels": labels}

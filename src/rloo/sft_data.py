"""Rows for supervised fine-tuning (``rloo sft``, and the tldr-tiny starting policy), tokenized as TRL's
SFTTrainer does, so that an SFTConfig user gets the same tokens and the same trained positions:

- prompt / completion (strings): ``tokenizer(prompt)`` and ``tokenizer(prompt + completion + EOS)``; the
  completion starts where the two token sequences part (a merge across the boundary is the completion's);
  ``completion_only_loss`` (None: on for these rows) trains on the completion and its EOS only.
- prompt / completion (chat messages): the prompt through the chat template with the generation prompt,
  the whole conversation through it; no EOS is added (the template ends the turn).
- messages: the conversation through the chat template; ``assistant_only_loss`` trains on the assistant
  turns only (the template's ``{% generation %}`` markers say where they are), else on every token.
- text (``dataset_text_field``): every token, the EOS appended.

``max_length`` keeps the start (TRL's ``keep_start``: the end of a long completion is cut, its EOS with
it); a row left with no trained token is dropped and counted. ``SFTExample.loss_mask`` is 1 where the
token is trained on: the loss at position t is ``-log p(input_ids[t] | input_ids[:t])``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1: trained on (the first token never is: nothing predicts it)


@dataclass
class SFTExamples:
    examples: list[SFTExample]
    kept_rows: list[int]  # the dataset row of each example
    num_dropped: int  # rows left with no trained token after truncation to max_length
    row_format: str  # "prompt_completion", "messages" or "text"

    @property
    def num_trained_tokens(self) -> int:
        return sum(sum(e.loss_mask[1:]) for e in self.examples)


def row_format(row: dict, dataset_text_field: str = "text") -> str:
    """Which SFT format a row is in, from its columns (TRL's rules); one line naming the columns otherwise."""
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "messages" in row:
        return "messages"
    if dataset_text_field in row:
        return "text"
    raise ValueError(f"SFT rows need 'prompt' and 'completion', 'messages', or '{dataset_text_field}' "
                     f"(dataset_text_field); this row has {sorted(row)}")


def tokenize_sft(rows: Iterable[dict], tokenizer: Any, max_length: int | None = 1024,
                 completion_only_loss: bool | None = None, assistant_only_loss: bool = False,
                 dataset_text_field: str = "text", eos_token: str | None = None) -> SFTExamples:
    """Every row tokenized with its trained positions, in order (all rows must share one format)."""
    rows = list(rows)
    if not rows:
        raise ValueError("train_dataset: no rows to train on")
    kind = row_format(rows[0], dataset_text_field)
    if assistant_only_loss and kind == "text":
        raise ValueError("assistant_only_loss: needs conversational rows ('messages', or chat-message prompt and "
                         "completion); these rows are plain text")
    if assistant_only_loss and not GENERATION_MARKER.search(tokenizer.chat_template or ""):
        raise ValueError("assistant_only_loss: the tokenizer's chat template has no {% generation %} markers, so the "
                         "assistant turns cannot be found; give a template with them (chat_template_path)")
    eos = eos_token or tokenizer.eos_token
    only_completion = kind == "prompt_completion" if completion_only_loss is None else completion_only_loss
    examples, kept, dropped = [], [], 0
    for index, row in enumerate(rows):
        if row_format(row, dataset_text_field) != kind:
            raise ValueError(f"train_dataset row {index}: its columns {sorted(row)} are not the {kind} format of "
                             "row 0 (one format per dataset)")
        ids, mask = _tokenize_row(row, kind, tokenizer, eos, only_completion, assistant_only_loss, dataset_text_field,
                                  index)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask[1:]):
            dropped += 1
            continue
        examples.append(SFTExample(ids, mask))
        kept.append(index)
    return SFTExamples(examples, kept, dropped, kind)


def _tokenize_row(row: dict, kind: str, tokenizer, eos: str, only_completion: bool, assistant_only: bool,
                  text_field: str, index: int) -> tuple[list[int], list[int]]:
    if kind == "text":
        text = _string(row[text_field], text_field, index)
        ids = tokenizer(text if text.endswith(eos) else text + eos).input_ids
        return ids, [1] * len(ids)
    if kind == "messages":
        return _chat(tokenizer, _messages(row["messages"], "messages", index), assistant_only)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        completion = _string(completion, "completion", index)
        if not completion.endswith(eos):
            completion += eos
        prompt_ids = tokenizer(prompt).input_ids
        ids = tokenizer(prompt + completion).input_ids
        assistant_mask = [1] * len(ids)
    else:
        prompt = _messages(prompt, "prompt", index)
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        ids, assistant_mask = _chat(tokenizer, prompt + _messages(completion, "completion", index), assistant_only)
    start = _common_prefix(prompt_ids, ids)
    completion_mask = [0] * start + [1] * (len(ids) - start)
    if only_completion:
        return ids, [a * c for a, c in zip(assistant_mask, completion_mask)]
    return ids, assistant_mask


def _chat(tokenizer, messages: list[dict], assistant_only: bool) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=assistant_only)
    ids = list(out["input_ids"])
    return ids, list(out["assistant_masks"]) if assistant_only else [1] * len(ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _string(value: Any, column: str, index: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"train_dataset row {index}: '{column}' is {type(value).__name__}, expected a string")
    return value


def _messages(value: Any, column: str, index: int) -> list[dict]:
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in value)):
        raise ValueError(f"train_dataset row {index}: '{column}' must be a list of {{'role', 'content'}} messages")
    return value

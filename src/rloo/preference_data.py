"""Preference pairs for a Bradley-Terry reward model (``rloo reward-model``), tokenized as TRL's
RewardTrainer does, so a RewardConfig user gets the same sequences:

- explicit prompt ``{prompt, chosen, rejected}`` or implicit ``{chosen, rejected}`` (the prompt is inside
  both), strings or chat messages; an optional ``margin`` column (a float per row);
- strings: EOS appended to chosen and rejected (unless there), then ``tokenizer(prompt + chosen)``; chat
  messages: ``apply_chat_template(prompt + chosen)`` (the template ends the turn);
- a pair with either sequence longer than ``max_length`` is dropped (not truncated: the score is read at
  the last token, which truncation would cut) and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass
class PreferencePairs:
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    margins: list[float] | None  # the dataset's margin column, when it has one
    kept_rows: list[int]
    num_dropped: int  # pairs over max_length
    conversational: bool


def tokenize_pairs(rows: Iterable[dict], tokenizer: Any, max_length: int | None = 1024,
                   eos_token: str | None = None) -> PreferencePairs:
    rows = list(rows)
    if not rows:
        raise ValueError("train_dataset: no preference pairs")
    for column in ("chosen", "rejected"):
        if column not in rows[0]:
            raise ValueError(f"preference rows need 'chosen' and 'rejected' (and optionally 'prompt', 'margin'); "
                             f"row 0 has {sorted(rows[0])}")
    conversational = isinstance(rows[0]["chosen"], list)
    with_margin = "margin" in rows[0]
    eos = eos_token or tokenizer.eos_token
    chosen_all, rejected_all, margins, kept, dropped = [], [], [], [], 0
    for index, row in enumerate(rows):
        missing = [c for c in ("chosen", "rejected", *(("margin",) if with_margin else ()),
                               *(("prompt",) if "prompt" in rows[0] else ())) if c not in row]
        if missing:
            raise ValueError(f"train_dataset row {index}: no '{missing[0]}' column (row 0 has it)")
        chosen, rejected = (side_ids(tokenizer, row, side, conversational, eos, index) for side in ("chosen", "rejected"))
        if max_length is not None and max(len(chosen), len(rejected)) > max_length:
            dropped += 1
            continue
        chosen_all.append(chosen)
        rejected_all.append(rejected)
        kept.append(index)
        if with_margin:
            margins.append(_margin(row["margin"], index))
    return PreferencePairs(chosen_all, rejected_all, margins if with_margin else None, kept, dropped, conversational)


def side_ids(tokenizer, row: dict, side: str, conversational: bool, eos: str, index: int) -> list[int]:
    """The token ids of ``prompt + row[side]`` (EOS appended to a string, the chat template on messages), as
    TRL's RewardTrainer builds a pair's side; also the reference completions that centering scores."""
    prompt, answer = row.get("prompt"), row[side]
    if conversational:
        messages = (prompt or []) + answer if isinstance(answer, list) else None
        if messages is None or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError(f"train_dataset row {index}: '{side}' must be a list of {{'role', 'content'}} messages, "
                             "as in row 0")
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    if not isinstance(answer, str) or not isinstance(prompt, (str, type(None))):
        raise ValueError(f"train_dataset row {index}: '{side}' and 'prompt' must be strings, as in row 0")
    if not answer.endswith(eos):
        answer += eos
    return tokenizer((prompt or "") + answer).input_ids


def _margin(value: Any, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"train_dataset row {index}: 'margin' is {type(value).__name__}, expected a number")
    return float(value)

"""Prompt datasets: loading, row checks, chat templates, truncation, padding and the prompt sampler.

Owns everything between "a name or a path the user typed" and "P prompt rows per step as token ids".
Rows carry a ``prompt`` (text, or a list of chat messages) and optional columns (``completion`` as a
reference summary, anything else) that reach reward functions by name (DESIGN.md §5).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from rloo.files import not_utf8, read_utf8
from rloo.hub import call_hub

logger = logging.getLogger(__name__)

_TLDR_DIR = Path(__file__).parent / "assets" / "tldr"
# "rloo:" cannot occur in a hub id, so a bundled name never shadows a hub dataset.
BUNDLED_DATASETS: dict[str, dict[str, Path]] = {
    "rloo:tldr": {
        "train": _TLDR_DIR / "tldr_train.jsonl",
        "validation": _TLDR_DIR / "tldr_validation.jsonl",
    },
    "rloo:tldr-preference": {  # human comparisons of two summaries of a post ({prompt, chosen, rejected})
        "train": _TLDR_DIR / "preferences_train.jsonl",
        "validation": _TLDR_DIR / "preferences_validation.jsonl",
    },
}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


# --------------------------------------------------------------------------------------------- loading
def load_prompt_dataset(
    name_or_path: str | datasets.Dataset, split: str = "train", prompt_column: str = "prompt"
) -> datasets.Dataset:
    """Load prompt rows from a Dataset, a bundled name, a local file or folder, or a hub id; check them.

    Resolution order: a ``datasets.Dataset`` given directly; a bundled name (``BUNDLED_DATASETS``);
    a local ``.jsonl/.json/.csv/.parquet`` file (``split`` ignored); a folder written by
    ``save_to_disk`` (a Dataset, or a DatasetDict from which ``split`` is taken); a local folder of
    data files (``load_dataset(folder, split=split)``); otherwise a hub id. Every result goes
    through ``validate_prompt_rows``, so a bad row fails here, before any model is loaded.
    """
    ds = _load_any(name_or_path, split, prompt_column)
    if ds.num_rows == 0:
        raise ValueError(f"dataset '{name_or_path}' (split {split!r}) is empty: no rows")
    validate_prompt_rows(ds, prompt_column)
    return ds


def load_rows(name_or_path: str | datasets.Dataset, split: str = "train") -> datasets.Dataset:
    """Rows of any columns (SFT rows, preference pairs), from what ``load_prompt_dataset`` reads; a 'prompt'
    column, where there is one, is checked as there."""
    ds = _load_any(name_or_path, split, "prompt")
    if ds.num_rows == 0:
        raise ValueError(f"dataset '{name_or_path}' (split {split!r}) is empty: no rows")
    return ds


def _load_any(name_or_path: str | datasets.Dataset, split: str, prompt_column: str) -> datasets.Dataset:
    if isinstance(name_or_path, datasets.Dataset):
        return name_or_path
    if isinstance(name_or_path, datasets.DatasetDict):
        return _pick_split(name_or_path, split, "the DatasetDict given")
    if isinstance(name_or_path, (list, tuple)):  # rows in memory: a list of dicts with the same columns
        if not all(isinstance(row, dict) for row in name_or_path):
            raise ValueError("dataset: a list given as a dataset must hold one dict per row")
        return datasets.Dataset.from_list(list(name_or_path))
    if not isinstance(name_or_path, (str, Path)):
        raise ValueError(f"dataset: expected a name, a path, a datasets.Dataset or a list of rows, got "
                         f"{type(name_or_path).__name__}")
    name = str(name_or_path)
    if name in BUNDLED_DATASETS:
        return _read_jsonl(_pick_split(BUNDLED_DATASETS[name], split, f"bundled dataset '{name}'"), prompt_column)
    if name.startswith("rloo:"):
        raise ValueError(f"unknown bundled dataset '{name}'; bundled: {sorted(BUNDLED_DATASETS)}")
    path = Path(name).expanduser()
    if path.is_file():
        return _read_file(path, prompt_column)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return _pick_split(loaded, split, f"'{path}'")
            return loaded
        return datasets.load_dataset(str(path), split=split)
    if path.suffix in FILE_SUFFIXES or name.startswith(("/", "./", "../", "~")):
        # Clearly meant as a file: "no such file" beats a hub error about a strange repo id.
        raise FileNotFoundError(f"dataset file '{name}' does not exist")
    return call_hub("dataset", name, lambda: datasets.load_dataset(name, split=split))


def _pick_split(splits: Any, split: str, where: str) -> Any:
    if split not in splits:
        raise ValueError(f"{where} has no split '{split}'; splits: {sorted(splits)}")
    return splits[split]


def _read_file(path: Path, prompt_column: str) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, prompt_column)
    if suffix == ".json":
        return _read_json(path, prompt_column)
    if suffix in (".csv", ".parquet"):
        if path.stat().st_size == 0:
            raise ValueError(f"dataset file {path} is empty: no rows")
        read = datasets.Dataset.from_csv if suffix == ".csv" else datasets.Dataset.from_parquet
        try:
            return read(str(path))
        except UnicodeDecodeError as err:
            raise not_utf8(path, path.read_bytes(), err) from None
        except Exception as err:  # pyarrow's and datasets' parse errors, which do not all name the file
            reason = " ".join(str(err).split())[:300]
            raise ValueError(f"dataset file {path}: not a readable {suffix[1:]} file ({type(err).__name__}: "
                             f"{reason})") from None
    raise ValueError(f"dataset file '{path}' has an unsupported suffix '{path.suffix}'; use one of {FILE_SUFFIXES}")


def _read_jsonl(path: Path, prompt_column: str) -> datasets.Dataset:
    """One JSON object per line; read here (not by ``datasets``) so an error can name the line."""
    rows = []
    for line_number, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f"dataset file {path} is empty: no rows")
    return _rows_to_dataset(rows, path, prompt_column)


def _read_json(path: Path, prompt_column: str) -> datasets.Dataset:
    """A JSON list of row objects, or a dict of equal-length columns; JSON lines named .json also work."""
    text = read_utf8(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON lines under a .json name
            return _read_jsonl(path, prompt_column)
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return _rows_to_dataset(data, path, prompt_column)
    if isinstance(data, dict) and data and all(isinstance(col, list) for col in data.values()):
        return _rows_to_dataset([dict(zip(data, values)) for values in zip(*data.values())], path, prompt_column)
    raise ValueError(f"{path}: expected a JSON list of row objects or a dict of column lists")


def _rows_to_dataset(rows: list[dict], path: Path, prompt_column: str) -> datasets.Dataset:
    columns: dict[str, list] = {key: [] for row in rows for key in row}  # union of keys, first-seen order
    for row in rows:
        for key, values in columns.items():
            values.append(row.get(key))
    if prompt_column in columns:
        # Check before Arrow sees mixed types, so a bad prompt gets a row message, not an ArrowTypeError.
        _check_prompts(columns[prompt_column], prompt_column)
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception as err:  # pyarrow: a column holding mixed types
        raise ValueError(f"{path}: rows cannot form one table (columns mix types?): {err}") from None


# ---------------------------------------------------------------------------------------- row checks
def validate_prompt_rows(ds: datasets.Dataset, prompt_column: str = "prompt") -> None:
    """Raise ValueError naming the first bad row (0-based) and what was expected; else return None.

    A prompt is non-empty text, or a non-empty list of chat messages, each a dict with a str
    ``role`` in ``CHAT_ROLES`` and a str ``content``. Reads the column once (fast on 100k rows).
    """
    if prompt_column not in ds.column_names:
        raise ValueError(f"dataset has no '{prompt_column}' column; columns: {ds.column_names}")
    # select_columns + to_dict reads the Arrow column in bulk; iterating ds[col] is ~10x slower.
    values = ds.select_columns([prompt_column]).with_format(None).to_dict()[prompt_column]
    _check_prompts(values, prompt_column)


def _check_prompts(values: list, prompt_column: str) -> None:
    expected = "non-empty text or a non-empty list of chat messages"
    for row, value in enumerate(values):
        where = f"row {row} (0-based) of column '{prompt_column}'"
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(f"{where}: expected {expected}, got {value!r} (empty or whitespace)")
        elif isinstance(value, list):
            if not value:
                raise ValueError(f"{where}: expected {expected}, got an empty list")
            for index, message in enumerate(value):
                if not _is_message(message):
                    raise ValueError(
                        f"{where}, message {index}: expected a dict with a str 'role' in {list(CHAT_ROLES)} "
                        f"and a str 'content', got {_short(message)}"
                    )
        else:
            raise ValueError(f"{where}: expected {expected}, got {_short(value)} ({type(value).__name__})")


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in CHAT_ROLES and isinstance(message.get("content"), str)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------ text and token ids
def render_prompt(prompt: str | list[dict], tokenizer: Any, chat_template_kwargs: dict | None = None) -> str:
    """Text unchanged; chat messages through the tokenizer's chat template, ready for the completion.

    As TRL's ``maybe_apply_chat_template``: a generation prompt is added, unless the last message
    is the assistant's, which is then continued (a prefilled answer). ``chat_template_kwargs`` (TRL's
    name) go to the template, e.g. ``{"enable_thinking": False}``.
    """
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "prompt is a list of chat messages but the tokenizer has no chat template; "
            "use a tokenizer with one (set tokenizer.chat_template) or give prompts as text"
        )
    continue_final = prompt[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=not continue_final, continue_final_message=continue_final,
        **(chat_template_kwargs or {}),
    )


@dataclass
class TokenizedPrompts:
    input_ids: list[list[int]]  # one list of token ids per prompt, unpadded, at most max_prompt_length long
    num_truncated: int  # prompts that were longer than max_prompt_length and lost their first tokens


def tokenize_prompts(
    texts: list[str], tokenizer: Any, max_prompt_length: int | None, warn: bool = True
) -> TokenizedPrompts:
    """Token ids per prompt, without special tokens; over-long prompts keep their LAST tokens.

    No special tokens, as TRL: chat templates carry their own BOS. Left truncation is the TL;DR
    recipe's choice (summarize_from_feedback_details): the end of the prompt holds "TL;DR:".
    ``warn=False`` leaves the warning to the caller (the trainer counts truncations over the run).
    """
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    input_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for index, ids in enumerate(input_ids):
        if not ids:
            raise ValueError(f"prompt {index} (0-based) has no tokens after tokenization: {_short(texts[index])}")
    num_truncated = 0
    if max_prompt_length is not None:
        num_truncated = sum(len(ids) > max_prompt_length for ids in input_ids)
        input_ids = [ids[-max_prompt_length:] for ids in input_ids]
    if num_truncated and warn:
        logger.warning(
            "%d of %d prompts were longer than max_prompt_length=%d tokens and were left-truncated",
            num_truncated, len(input_ids), max_prompt_length,
        )
    return TokenizedPrompts(input_ids=[list(ids) for ids in input_ids], num_truncated=num_truncated)


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (input_ids_BL, attention_mask_BL), long tensors left padded to the longest sequence.

    Left padding keeps every prompt's last token in column L-1, where generation continues.
    """
    num_columns = max((len(seq) for seq in sequences), default=0)
    input_ids_BL = torch.full((len(sequences), num_columns), pad_token_id, dtype=torch.long)
    attention_mask_BL = torch.zeros((len(sequences), num_columns), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids_BL[row, num_columns - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask_BL[row, num_columns - len(seq):] = 1
    return input_ids_BL, attention_mask_BL


# ------------------------------------------------------------------------------------------ sampling
def right_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (input_ids_BT, attention_mask_BT), long tensors right padded to the longest (completions)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class PromptSampler:
    """Row indices, ``num_prompts`` per batch, forever; a seeded permutation per epoch, exact resume.

    Epoch e uses ``torch.randperm`` with a generator seeded ``seed + e`` (independent of the
    global RNG), or file order when ``shuffle`` is False. Each global batch (``num_prompts * world_size`` rows) is a contiguous slice of
    the permutation; rank r takes its r-th slice of ``num_prompts``, so ranks neither overlap nor
    leave gaps. An epoch's last partial global batch is dropped, so every batch is full.
    """

    def __init__(self, num_rows: int, num_prompts: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if num_prompts < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"PromptSampler needs num_prompts >= 1, world_size >= 1 and 0 <= rank < world_size; "
                f"got num_prompts={num_prompts}, rank={rank}, world_size={world_size}"
            )
        self.num_global = num_prompts * world_size
        if num_rows < self.num_global:
            raise ValueError(
                f"dataset has {num_rows} rows, fewer than one batch of num_prompts * world_size = "
                f"{num_prompts} * {world_size} = {self.num_global} prompts"
            )
        self.num_rows, self.num_prompts, self.seed = num_rows, num_prompts, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0
        self.position = 0  # rows of this epoch's permutation already handed out (all ranks together)
        self._permutations: dict[tuple[int, int], list[int]] = {}  # (seed, epoch) -> this epoch's order

    def _epoch_permutation(self) -> list[int]:
        key = (self.seed, self.epoch)
        if key not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator) if self.shuffle else torch.arange(self.num_rows)
            self._permutations = {key: order.tolist()}
        return self._permutations[key]

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[int]:
        if self.position + self.num_global > self.num_rows:  # drop the partial tail, start a new epoch
            self.epoch += 1
            self.position = 0
        start = self.position + self.rank * self.num_prompts
        indices = self._epoch_permutation()[start : start + self.num_prompts]
        self.position += self.num_global
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_rows:
            raise ValueError(f"PromptSampler state out of range for {self.num_rows} rows: {state}")
        self.epoch, self.position, self.seed = epoch, position, int(state["seed"])


def gather_rows(
    ds: datasets.Dataset, indices: list[int], prompt_column: str = "prompt"
) -> tuple[list, dict[str, list]]:
    """-> (prompts, columns): the prompt of each index, and every other column as a list (for reward functions)."""
    batch = ds.with_format(None)[list(indices)]
    prompts = batch.pop(prompt_column)
    return prompts, batch

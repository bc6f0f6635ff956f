"""Tests for rloo.data: every source format, row checks, chat templates, truncation, padding, sampling."""

import json
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets is imported: it reads this once

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rloo.data import (
    BUNDLED_DATASETS,
    PromptSampler,
    TokenizedPrompts,
    gather_rows,
    left_pad,
    load_prompt_dataset,
    render_prompt,
    tokenize_prompts,
    validate_prompt_rows,
)
from rloo.hub import HubUnreachableError

ROWS = [
    {"prompt": "SUBREDDIT: r/a\n\nPOST: one\n\nTL;DR:", "completion": " first", "score": 1},
    {"prompt": "SUBREDDIT: r/b\n\nPOST: two\n\nTL;DR:", "completion": " second", "score": 2},
    {"prompt": "SUBREDDIT: r/c\n\nPOST: three\n\nTL;DR:", "completion": " third", "score": 3},
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny word-level tokenizer trained on a few lines; no hub needed."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    lines = ["the cat sat on the mat TL;DR: a cat", "hello world one two three four five six"] * 3
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


# ----------------------------------------------------------------------------------------- loading
def _check_rows(ds):
    assert ds.num_rows == 3
    assert ds["prompt"][:] == [row["prompt"] for row in ROWS]
    assert ds["completion"][:] == [row["completion"] for row in ROWS]


def test_load_jsonl_json_csv_parquet(tmp_path):
    reference = datasets.Dataset.from_list(ROWS)
    _check_rows(load_prompt_dataset(str(_write_jsonl(tmp_path / "p.jsonl", ROWS)), split="ignored"))
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    _check_rows(load_prompt_dataset(str(tmp_path / "list.json")))
    (tmp_path / "columns.json").write_text(json.dumps(reference.to_dict()))
    _check_rows(load_prompt_dataset(str(tmp_path / "columns.json")))
    _check_rows(load_prompt_dataset(str(_write_jsonl(tmp_path / "lines.json", ROWS))))
    reference.to_csv(str(tmp_path / "p.csv"))
    _check_rows(load_prompt_dataset(str(tmp_path / "p.csv")))
    reference.to_parquet(str(tmp_path / "p.parquet"))
    _check_rows(load_prompt_dataset(str(tmp_path / "p.parquet")))


def test_load_dataset_object_and_saved_folders(tmp_path):
    reference = datasets.Dataset.from_list(ROWS)
    assert load_prompt_dataset(reference) is reference
    reference.save_to_disk(str(tmp_path / "single"))
    _check_rows(load_prompt_dataset(str(tmp_path / "single")))
    datasets.DatasetDict({"train": reference, "test": reference.select([0])}).save_to_disk(str(tmp_path / "dict"))
    _check_rows(load_prompt_dataset(str(tmp_path / "dict"), split="train"))
    assert load_prompt_dataset(str(tmp_path / "dict"), split="test").num_rows == 1
    with pytest.raises(ValueError, match=r"has no split 'validation'; splits: \['test', 'train'\]"):
        load_prompt_dataset(str(tmp_path / "dict"), split="validation")


def test_load_folder_of_data_files(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", ROWS)
    _check_rows(load_prompt_dataset(str(folder), split="train"))


def test_bundled_tldr():
    assert set(BUNDLED_DATASETS["rloo:tldr"]) == {"train", "validation"}
    train = load_prompt_dataset("rloo:tldr")
    validation = load_prompt_dataset("rloo:tldr", split="validation")
    assert (train.num_rows, validation.num_rows) == (1445, 200)
    for ds in (train, validation):
        assert ds.column_names == ["prompt", "completion"]  # exactly trl-lib/tldr
        assert ds.features == datasets.Features(
            {"prompt": datasets.Value("string"), "completion": datasets.Value("string")}
        )
        assert ds[0]["prompt"].startswith("SUBREDDIT: r/") and ds[0]["prompt"].endswith("TL;DR:")
    with pytest.raises(ValueError, match=r"no split 'test'; splits: \['train', 'validation'\]"):
        load_prompt_dataset("rloo:tldr", split="test")
    with pytest.raises(ValueError, match="unknown bundled dataset 'rloo:nope'"):
        load_prompt_dataset("rloo:nope")


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "unterminated\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 3: not valid JSON"):
        load_prompt_dataset(str(path))
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object, got list"):
        load_prompt_dataset(str(path))


def test_jsonl_bad_prompt_named_before_arrow(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "fine"}, {"prompt": 42}])
    with pytest.raises(ValueError, match=r"row 1 \(0-based\) of column 'prompt'.*got 42 \(int\)"):
        load_prompt_dataset(str(path))


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_dataset(str(tmp_path / "absent.jsonl"))
    (tmp_path / "p.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported suffix '\.txt'"):
        load_prompt_dataset(str(tmp_path / "p.txt"))


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as info:
        load_prompt_dataset("nonexistent-org/nonexistent-dataset")
    message = str(info.value)
    assert "nonexistent-org/nonexistent-dataset" in message and "\n" not in message


# -------------------------------------------------------------------------------------- row checks
def test_missing_column_lists_columns():
    ds = datasets.Dataset.from_dict({"text": ["a"], "label": [1]})
    with pytest.raises(ValueError, match=r"dataset has no 'prompt' column; columns: \['text', 'label'\]"):
        validate_prompt_rows(ds)
    validate_prompt_rows(ds, prompt_column="text")


@pytest.mark.parametrize(
    "bad, expected",
    [
        (None, r"row 1 \(0-based\) of column 'prompt': expected non-empty text or a non-empty list of chat "
               r"messages, got None"),
        ("", r"row 1 \(0-based\).*got '' \(empty or whitespace\)"),
        ("   ", r"row 1 \(0-based\).*got '   ' \(empty or whitespace\)"),
        (42, r"row 1 \(0-based\).*got 42 \(int\)"),
        ([], r"row 1 \(0-based\).*got an empty list"),
        ([{"role": "user"}], r"row 1 \(0-based\).*message 0: expected a dict with a str 'role' in .* and a str 'con"),
        ([{"role": 1, "content": "x"}], r"row 1 \(0-based\).*message 0: expected a dict with a str 'role'"),
        ([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}], r"message 1: .*'robot'"),
        (["just text"], r"message 0: expected a dict"),
    ],
)
def test_bad_rows(tmp_path, bad, expected):
    # Through a jsonl file: Arrow could not even hold a mix like "text" and 42 in one column.
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a good prompt"}, {"prompt": bad}])
    with pytest.raises(ValueError, match=expected):
        load_prompt_dataset(str(path))


def test_bad_rows_in_arrow_datasets():
    with pytest.raises(ValueError, match=r"row 2 \(0-based\).*got None"):
        validate_prompt_rows(datasets.Dataset.from_dict({"prompt": ["a", "b", None]}))
    with pytest.raises(ValueError, match=r"row 0 \(0-based\).*got 42 \(int\)"):
        validate_prompt_rows(datasets.Dataset.from_dict({"prompt": [42]}))
    with pytest.raises(ValueError, match=r"row 1 \(0-based\).*empty or whitespace"):
        validate_prompt_rows(datasets.Dataset.from_dict({"prompt": ["a", "  \n"]}))
    # Arrow fills a message's missing 'content' with None when rows disagree.
    messages = [[{"role": "user", "content": "hi"}], [{"role": "user"}]]
    with pytest.raises(ValueError, match=r"row 1 \(0-based\).*message 0"):
        validate_prompt_rows(datasets.Dataset.from_list([{"prompt": m} for m in messages]))
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    validate_prompt_rows(datasets.Dataset.from_list([{"prompt": chat}]))


def test_validate_is_fast_on_100k_rows():
    ds = datasets.Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(100_000)]}).shuffle(seed=0)
    start = time.perf_counter()
    validate_prompt_rows(ds)
    assert time.perf_counter() - start < 5.0


# ------------------------------------------------------------------------------ text and token ids
def test_render_prompt(tokenizer):
    assert render_prompt("plain text TL;DR:", tokenizer) == "plain text TL;DR:"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        render_prompt(messages, tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        assert render_prompt(messages, tokenizer) == "<system> be brief </s> <user> hello world </s> <assistant>"
    finally:
        tokenizer.chat_template = None


def test_tokenize_left_truncation(tokenizer, caplog):
    texts = ["the cat sat on the mat TL;DR:", "hello world", "one two three four five six"]
    full = tokenizer(texts, add_special_tokens=False)["input_ids"]
    with caplog.at_level(logging.WARNING, logger="rloo.data"):
        out = tokenize_prompts(texts, tokenizer, max_prompt_length=4)
    assert isinstance(out, TokenizedPrompts)
    assert out.input_ids == [full[0][-4:], full[1], full[2][-4:]]
    assert tokenizer.decode(out.input_ids[0]).endswith("TL ; DR :")  # the end of the prompt survives
    assert out.num_truncated == 2
    warnings = [r for r in caplog.records if r.name == "rloo.data"]
    assert len(warnings) == 1
    assert "2 of 3 prompts were longer than max_prompt_length=4 tokens and were left-truncated" in warnings[0].message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rloo.data"):
        untouched = tokenize_prompts(texts, tokenizer, max_prompt_length=None)
    assert untouched.input_ids == full and untouched.num_truncated == 0
    assert not [r for r in caplog.records if r.name == "rloo.data"]


def test_tokenize_errors(tokenizer):
    with pytest.raises(ValueError, match=r"prompt 1 \(0-based\) has no tokens"):
        tokenize_prompts(["hello", ""], tokenizer, max_prompt_length=8)
    with pytest.raises(ValueError, match="max_prompt_length must be >= 1"):
        tokenize_prompts(["hello"], tokenizer, max_prompt_length=0)


def test_left_pad():
    input_ids_BL, attention_mask_BL = left_pad([[5, 6, 7], [8], [9, 10]], pad_token_id=0)
    assert input_ids_BL.dtype == attention_mask_BL.dtype == torch.long
    assert input_ids_BL.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert attention_mask_BL.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    empty_ids, empty_mask = left_pad([], pad_token_id=0)
    assert empty_ids.shape == empty_mask.shape == (0, 0)


# ------------------------------------------------------------------------------------------ sampling
def _take(sampler, num_batches):
    return [next(sampler) for _ in range(num_batches)]


def test_sampler_epoch_covers_each_index_once():
    sampler = PromptSampler(num_rows=10, num_prompts=3, seed=1)
    epoch0 = _take(sampler, 3)
    seen = [i for batch in epoch0 for i in batch]
    assert len(seen) == len(set(seen)) == 9 and set(seen) <= set(range(10))  # one row dropped
    permutation = torch.randperm(10, generator=torch.Generator().manual_seed(1)).tolist()
    assert seen == permutation[:9]
    epoch1 = _take(sampler, 3)
    assert sampler.state_dict()["epoch"] == 1
    assert epoch1 != epoch0


def test_sampler_same_seed_same_order_independent_of_global_rng():
    torch.manual_seed(0)
    first = _take(PromptSampler(20, 4, seed=7), 12)
    torch.manual_seed(123)
    torch.rand(5)
    assert _take(PromptSampler(20, 4, seed=7), 12) == first
    assert _take(PromptSampler(20, 4, seed=8), 12) != first


def test_sampler_resume_is_exact():
    straight = _take(PromptSampler(11, 3, seed=3), 10)
    interrupted = PromptSampler(11, 3, seed=3)
    head = _take(interrupted, 4)  # crosses into the second epoch
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a checkpoint file
    assert set(state) == {"epoch", "position", "seed"}
    resumed = PromptSampler(11, 3, seed=999)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 6) == straight


def test_sampler_ranks_partition_global_batch():
    single = PromptSampler(23, 6, seed=5)
    rank0 = PromptSampler(23, 3, seed=5, rank=0, world_size=2)
    rank1 = PromptSampler(23, 3, seed=5, rank=1, world_size=2)
    for _ in range(8):  # several epochs
        a, b = next(rank0), next(rank1)
        assert not set(a) & set(b)
        assert a + b == next(single)


def test_sampler_errors():
    with pytest.raises(ValueError, match=r"dataset has 5 rows, fewer than one batch .* = 3 \* 2 = 6"):
        PromptSampler(5, 3, world_size=2)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        PromptSampler(10, 2, rank=2, world_size=2)


def test_gather_rows():
    ds = datasets.Dataset.from_list(ROWS)
    prompts, columns = gather_rows(ds, [2, 0])
    assert prompts == [ROWS[2]["prompt"], ROWS[0]["prompt"]]
    assert columns == {"completion": [" third", " first"], "score": [3, 1]}


def test_prompt_sampler_without_shuffle_follows_file_order():
    sampler = PromptSampler(num_rows=10, num_prompts=4, seed=3, shuffle=False)
    assert [next(sampler) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]

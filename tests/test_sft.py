"""Supervised fine-tuning rows (rloo.sft_data): the tokens and trained positions TRL's SFTTrainer (TRL 1.16,
the test extra) prepares for the same rows and settings, on the bundled TL;DR pairs and on chat messages."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from rloo.data import BUNDLED_DATASETS
from rloo.sft_data import tokenize_sft

CHATML_WITH_MARKERS = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tldr_rows(n: int) -> list[dict]:
    lines = BUNDLED_DATASETS["rloo:tldr"]["train"].read_text().splitlines()[:n]
    return [{key: json.loads(line)[key] for key in ("prompt", "completion")} for line in lines]


def trl_prepared(model_dir, tokenizer, rows: list[dict], tmp_path, **settings) -> list[dict]:
    """The rows as TRL's SFTTrainer prepares them (its constructor tokenizes, truncates and drops)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none", use_cpu=True, **settings)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return list(trainer.train_dataset)


def trained_positions(prepared: dict) -> list[int]:
    """TRL's labels: the token where trained on, -100 elsewhere; its completion_mask / assistant_masks when kept."""
    if "labels" in prepared:
        return [int(label != -100) for label in prepared["labels"]]
    masks = [prepared[name] for name in ("completion_mask", "assistant_masks") if name in prepared]
    return [int(all(m[i] for m in masks)) for i in range(len(prepared["input_ids"]))] if masks else \
        [1] * len(prepared["input_ids"])


@pytest.mark.parametrize("max_length", [700, None])
def test_prompt_completion_rows_are_tokenized_as_trl_does(tiny_model_dir, tiny_tokenizer, tmp_path, max_length):
    """TL;DR pairs (strings): the same input ids, the completion and its EOS trained on; at max_length 700 the
    long rows lose the end of their completion or, with a prompt that fills it, are dropped, as in TRL."""
    rows = tldr_rows(24)
    ours = tokenize_sft(rows, tiny_tokenizer, max_length=max_length)
    theirs = trl_prepared(tiny_model_dir, tiny_tokenizer, rows, tmp_path, max_length=max_length)
    assert ours.row_format == "prompt_completion"
    assert [e.input_ids for e in ours.examples] == [t["input_ids"] for t in theirs]
    assert [e.loss_mask for e in ours.examples] == [trained_positions(t) for t in theirs]
    assert [rows[i]["prompt"] for i in ours.kept_rows] == [t["prompt"] for t in theirs]
    if max_length is not None:
        assert ours.num_dropped > 0 and any(e.input_ids[-1] != tiny_tokenizer.eos_token_id for e in ours.examples)
        assert all(len(e.input_ids) <= max_length for e in ours.examples)
    else:
        assert ours.num_dropped == 0 and all(e.input_ids[-1] == tiny_tokenizer.eos_token_id for e in ours.examples)
    first = ours.examples[0]
    prompt_length = len(tiny_tokenizer(rows[ours.kept_rows[0]]["prompt"]).input_ids)
    assert first.loss_mask[:prompt_length - 1] == [0] * (prompt_length - 1) and first.loss_mask[-1] == 1


def test_completion_only_loss_false_trains_on_every_token(tiny_model_dir, tiny_tokenizer, tmp_path):
    rows = tldr_rows(6)
    ours = tokenize_sft(rows, tiny_tokenizer, max_length=None, completion_only_loss=False)
    theirs = trl_prepared(tiny_model_dir, tiny_tokenizer, rows, tmp_path, max_length=None, completion_only_loss=False)
    assert [e.loss_mask for e in ours.examples] == [trained_positions(t) for t in theirs]
    assert all(set(e.loss_mask) == {1} for e in ours.examples)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with ChatML turn tokens and a template that marks the assistant's tokens."""
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer.__class__.from_str(
        tiny_tokenizer.backend_tokenizer.to_str()), bos_token=None, eos_token="<|endoftext|>", pad_token="<|padding|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML_WITH_MARKERS
    return tokenizer


def chat_rows() -> list[dict]:
    rows = []
    for row in tldr_rows(4):
        rows.append({"messages": [{"role": "system", "content": "Summarize the post."},
                                  {"role": "user", "content": row["prompt"][:300]},
                                  {"role": "assistant", "content": row["completion"]},
                                  {"role": "user", "content": "Shorter?"},
                                  {"role": "assistant", "content": row["completion"][:20]}]})
    return rows


@pytest.mark.parametrize("assistant_only_loss", [True, False])
def test_messages_are_tokenized_as_trl_does(tiny_model_dir, chat_tokenizer, tmp_path, assistant_only_loss):
    """Chat rows with two assistant turns: both turns (with their end-of-turn token) trained on and nothing
    else under assistant_only_loss; every token otherwise; the ids and positions TRL's."""
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "chat-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(chat_tokenizer))
    model.save_pretrained(model_dir)
    rows = chat_rows()
    ours = tokenize_sft(rows, chat_tokenizer, max_length=None, assistant_only_loss=assistant_only_loss)
    theirs = trl_prepared(model_dir, chat_tokenizer, rows, tmp_path, max_length=None,
                          assistant_only_loss=assistant_only_loss)
    assert [e.input_ids for e in ours.examples] == [t["input_ids"] for t in theirs]
    assert [e.loss_mask for e in ours.examples] == [trained_positions(t) for t in theirs]
    end_of_turn = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for example in ours.examples:
        trained = [token for token, m in zip(example.input_ids, example.loss_mask) if m]
        if assistant_only_loss:
            assert trained.count(end_of_turn) == 2 and 0 < len(trained) < len(example.input_ids)
        else:
            assert len(trained) == len(example.input_ids)


def test_text_rows_train_on_every_token_with_eos(tiny_model_dir, tiny_tokenizer, tmp_path):
    rows = [{"text": row["prompt"] + row["completion"]} for row in tldr_rows(5)]
    ours = tokenize_sft(rows, tiny_tokenizer, max_length=None)
    theirs = trl_prepared(tiny_model_dir, tiny_tokenizer, rows, tmp_path, max_length=None)
    assert [e.input_ids for e in ours.examples] == [t["input_ids"] for t in theirs]
    assert all(e.input_ids[-1] == tiny_tokenizer.eos_token_id and set(e.loss_mask) == {1} for e in ours.examples)


def test_bad_rows_are_refused_in_one_line(tiny_tokenizer, chat_tokenizer):
    with pytest.raises(ValueError, match=r"SFT rows need 'prompt' and 'completion', 'messages', or 'text'"):
        tokenize_sft([{"question": "a"}], tiny_tokenizer)
    with pytest.raises(ValueError, match=r"row 1: its columns \['text'\] are not the prompt_completion format"):
        tokenize_sft([{"prompt": "a", "completion": "b"}, {"text": "c"}], tiny_tokenizer)
    with pytest.raises(ValueError, match=r"row 0: 'completion' is int, expected a string"):
        tokenize_sft([{"prompt": "a", "completion": 3}], tiny_tokenizer)
    with pytest.raises(ValueError, match=r"assistant_only_loss: the tokenizer's chat template has no"):
        tiny_tokenizer.chat_template = None
        tokenize_sft(chat_rows(), tiny_tokenizer, assistant_only_loss=True)
    with pytest.raises(ValueError, match=r"row 0: 'messages' must be a list"):
        tokenize_sft([{"messages": "hello"}], chat_tokenizer)


def test_the_loss_and_its_gradient_are_trls(tiny_model_dir, tiny_tokenizer, tmp_path):
    """One micro-batch of TL;DR pairs: rloo's loss over the step's trained-token count N equals TRL's
    compute_loss(model, inputs, num_items_in_batch=N) on its collated batch, and so do the gradients."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rloo.sft_objective import sft_batch, sft_loss

    rows = tldr_rows(6)
    ours = tokenize_sft(rows, tiny_tokenizer, max_length=None)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # no dropout: both passes the same function
    args = SFTConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none", use_cpu=True, max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    inputs = trainer.data_collator(list(trainer.train_dataset))
    num_items = 3 * ours.num_trained_tokens  # as if two more micro-batches followed in the step
    theirs = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(num_items))
    their_grads = torch.autograd.grad(theirs, list(model.parameters()))
    loss, _ = sft_loss(model, sft_batch(ours.examples, tiny_tokenizer.pad_token_id), num_items)
    our_grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-5)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

"""Preference pairs and the Bradley-Terry loss (rloo.preference_data, rloo.reward_objective): the sequences
TRL's RewardTrainer (TRL 1.16, the test extra) prepares for the same rows, its loss with and without the
margin column and the centering term, and the same gradients; on the bundled human preference pairs."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from rloo.data import _TLDR_DIR
from rloo.preference_data import tokenize_pairs
from rloo.reward_objective import bradley_terry_loss, pair_accuracy, pair_scores


def preference_rows(n: int) -> list[dict]:
    lines = (_TLDR_DIR / "preferences_train.jsonl").read_text().splitlines()[:n]
    return [{key: json.loads(line)[key] for key in ("prompt", "chosen", "rejected")} for line in lines]


def trl_reward_trainer(model, tokenizer, rows, tmp_path, **settings):
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none", use_cpu=True, **settings)
    return RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


@pytest.mark.parametrize("prompt", ["explicit", "implicit"])
def test_pairs_are_tokenized_as_trl_does(tiny_policy_reward_model_dir, tiny_tokenizer, tmp_path, prompt):
    """The bundled pairs, with the prompt in its own column or inside chosen and rejected: the same ids, EOS at
    the end, and at max_length 600 the same pairs dropped (either side too long)."""
    from transformers import AutoModelForSequenceClassification

    rows = preference_rows(20)
    if prompt == "implicit":
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    ours = tokenize_pairs(rows, tiny_tokenizer, max_length=600)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_policy_reward_model_dir)
    theirs = list(trl_reward_trainer(model, tiny_tokenizer, rows, tmp_path, max_length=600).train_dataset)
    assert ours.chosen_ids == [t["chosen_ids"] for t in theirs] and ours.rejected_ids == [t["rejected_ids"] for t in theirs]
    assert 0 < ours.num_dropped < len(rows) and len(ours.kept_rows) == len(theirs)
    assert all(ids[-1] == tiny_tokenizer.eos_token_id for ids in ours.chosen_ids + ours.rejected_ids)


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (False, 0.01)])
def test_the_loss_and_its_gradient_are_trls(tiny_policy_reward_model_dir, tiny_tokenizer, tmp_path, margin, center):
    from transformers import AutoModelForSequenceClassification

    rows = preference_rows(4)
    if margin:
        rows = [dict(r, margin=0.5 * i) for i, r in enumerate(rows)]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_policy_reward_model_dir).eval()
    trainer = trl_reward_trainer(model, tiny_tokenizer, rows, tmp_path, max_length=None,
                                 center_rewards_coefficient=center)
    inputs = trainer.data_collator(list(trainer.train_dataset))
    theirs = trainer.compute_loss(model, inputs)
    their_grads = torch.autograd.grad(theirs, list(model.parameters()))
    pairs = tokenize_pairs(rows, tiny_tokenizer, max_length=None)
    r_chosen, r_rejected = pair_scores(model, pairs.chosen_ids, pairs.rejected_ids, tiny_tokenizer.pad_token_id)
    margins = torch.tensor(pairs.margins) if pairs.margins is not None else None
    loss = bradley_terry_loss(r_chosen, r_rejected, margins, center)
    our_grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-5)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_pair_accuracy_counts_ties_as_wrong_with_its_standard_error():
    accuracy, error = pair_accuracy(torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([0.0, 2.0, 1.0, 1.0]))
    assert accuracy == 0.5 and error == pytest.approx((0.25 / 4) ** 0.5)


def test_bad_pairs_are_refused_in_one_line(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"preference rows need 'chosen' and 'rejected'"):
        tokenize_pairs([{"prompt": "a", "chosen": "b"}], tiny_tokenizer)
    with pytest.raises(ValueError, match=r"row 1: no 'margin' column"):
        tokenize_pairs([{"chosen": "a", "rejected": "b", "margin": 1.0}, {"chosen": "a", "rejected": "b"}], tiny_tokenizer)
    with pytest.raises(ValueError, match=r"row 0: 'margin' is str, expected a number"):
        tokenize_pairs([{"chosen": "a", "rejected": "b", "margin": "high"}], tiny_tokenizer)
    with pytest.raises(ValueError, match=r"row 1: 'rejected' and 'prompt' must be strings"):
        tokenize_pairs([{"chosen": "a", "rejected": "b"}, {"chosen": "a", "rejected": 2}], tiny_tokenizer)

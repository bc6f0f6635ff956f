"""``rloo reward-model`` end to end on tiny real models: TRL's RewardConfig defaults, a preference it can learn
learned, the bundled human pairs' held-out accuracy reported with its standard error, a run folder that
loads with AutoModelForSequenceClassification and as ``rloo train``'s reward model, and a bit-identical
resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from rloo.data import BUNDLED_DATASETS
from rloo.reward_config import RewardConfig
from rloo.reward_stage import reward_model

DIFFERENT_ON_PURPOSE = {"save_total_limit", "eval_on_start", "report_to", "disable_tqdm"}  # as for rloo sft


def rm_config(model_dir, out, **overrides) -> RewardConfig:
    values = dict(model_name_or_path=str(model_dir), dataset_name="rloo:tldr-preference", dataset_eval_split="validation",
                  num_eval_samples=40, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3, max_length=512,
                  output_dir=str(out), disable_tqdm=True, gradient_checkpointing=False, logging_steps=1, seed=0)
    return RewardConfig(**{**values, **overrides})


def summary_pairs(split: str, n: int) -> Dataset:
    """Each post with its reference summary chosen over a two-token non-summary."""
    rows = [json.loads(line) for line in BUNDLED_DATASETS["rloo:tldr"][split].read_text().splitlines()[:n]]
    return Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " lol"} for r in rows])


def test_defaults_are_trls_reward_config_where_it_has_the_field():
    from trl import RewardConfig as TRLRewardConfig

    theirs = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(TRLRewardConfig)
              if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    ours = RewardConfig().to_dict()
    shared = [name for name in ours if name in theirs]
    assert len(shared) >= 40 and {"learning_rate", "max_length", "center_rewards_coefficient", "disable_dropout"} <= set(shared)
    assert {name for name in shared if ours[name] != theirs[name]} <= DIFFERENT_ON_PURPOSE
    assert RewardConfig().learning_rate == 1e-4 and RewardConfig().disable_dropout is True


def test_a_learnable_preference_is_learned_and_the_folder_loads_as_a_reward_model(tiny_model_dir, tmp_path, monkeypatch):
    result = reward_model(rm_config(tiny_model_dir, tmp_path / "rm", max_steps=20, per_device_train_batch_size=8,
                                    num_eval_samples=60), train_dataset=summary_pairs("train", 300),
                          eval_dataset=summary_pairs("validation", 60))
    after = result.eval_after
    assert after["accuracy"] >= 0.9 and after["num_pairs"] > 0 and after["mean_chosen"] > after["mean_rejected"]
    assert after["accuracy_se"] == pytest.approx((after["accuracy"] * (1 - after["accuracy"]) / after["num_pairs"]) ** 0.5)
    out = result.output_dir
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == 1
    card = (out / "README.md").read_text()
    assert "rloo reward-model" in card and f"{after['accuracy']:.3f}" in card
    monkeypatch.chdir(tmp_path)
    exec(compile(card.split("```python\n")[1].split("```")[0], "quick start", "exec"), {})
    from rloo import train
    from test_train_e2e import tiny_config

    trained = train(tiny_config(tiny_model_dir, tmp_path / "rl", reward_model_name_or_path=str(out), reward_funcs=[],
                                reward_weights=None, max_steps=1, num_eval_samples=0))
    assert len(trained.metrics) == 1 and abs(trained.metrics[0]["reward"]) > 0


def test_the_bundled_human_pairs_report_accuracy_with_its_standard_error(tiny_model_dir, tmp_path):
    result = reward_model(rm_config(tiny_model_dir, tmp_path / "human", max_steps=3, eval_strategy="steps", eval_steps=2))
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval/accuracy" in line] == [0, 2, 3]  # periodic, as TRL's eval_steps
    for figures in (result.eval_before, result.eval_after):
        n = figures["num_pairs"]
        assert 0 < n <= 40 and 0.0 <= figures["accuracy"] <= 1.0
        assert figures["accuracy_se"] == pytest.approx((figures["accuracy"] * (1 - figures["accuracy"]) / n) ** 0.5)
    assert json.loads((result.output_dir / "eval.json").read_text())["after"] == pytest.approx(result.eval_after)


def test_a_resumed_reward_model_run_is_bit_identical(tiny_model_dir, tmp_path):
    settings = dict(lr_scheduler_type="constant", save_steps=2, num_eval_samples=8, center_rewards_coefficient=0.01)
    full = reward_model(rm_config(tiny_model_dir, tmp_path / "full", max_steps=4, **settings))
    reward_model(rm_config(tiny_model_dir, tmp_path / "part", max_steps=2, **settings))
    resumed = reward_model(rm_config(tiny_model_dir, tmp_path / "part", max_steps=4, resume_from_checkpoint="latest",
                                     **settings))
    a, b = load_file(full.output_dir / "model.safetensors"), load_file(resumed.output_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in full.metrics] == [m["loss"] for m in resumed.metrics]
    assert resumed.eval_after == full.eval_after


def _saved(tmp_path, name: str, tiny_tokenizer, dtype=torch.float32):
    """A tiny random causal LM of an architecture from architectures.py, saved with the test tokenizer."""
    from architectures import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name)).to(dtype)
    folder = tmp_path / name
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def short_rows(split: str, n: int) -> list[dict]:
    """TL;DR rows cut to the last 160 characters of the post, to fit the 256 positions of architectures.py."""
    rows = [json.loads(line) for line in BUNDLED_DATASETS["rloo:tldr"][split].read_text().splitlines()[:n]]
    return [{"prompt": r["prompt"][-160:], "completion": r["completion"][:80]} for r in rows]


@pytest.mark.parametrize("name, dtype", [("gpt_neox", torch.float32), ("gpt2", torch.bfloat16)])
def test_centering_on_reference_summaries_holds_in_the_saved_weights(name, dtype, tmp_path, tiny_tokenizer):
    """The N+ recipe: after training, the reference completions score 0 on average wherever the folder is loaded
    (here plain transformers), and the accuracy, which depends on score differences only, is untouched."""
    from transformers import AutoModelForSequenceClassification

    from rloo.reward_center import reference_sequences, scores

    references = tmp_path / "references.jsonl"
    references.write_text("".join(json.dumps(r) + "\n" for r in short_rows("train", 12)))
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " lol"} for r in short_rows("validation", 24)]
    base = _saved(tmp_path, name, tiny_tokenizer, dtype)
    result = reward_model(rm_config(base, tmp_path / "rm", max_steps=2, torch_dtype=str(dtype).split(".")[1],
                                    max_length=256, center_rewards_dataset=str(references), num_center_samples=10),
                          train_dataset=pairs[:16], eval_dataset=pairs[16:])
    centering = result.eval_after["centering"]
    assert centering["num_rows"] == 10 and abs(centering["reference_mean_before"]) > 1e-3
    model = AutoModelForSequenceClassification.from_pretrained(result.output_dir)
    assert model.dtype == dtype
    mean = scores(model, reference_sequences(short_rows("train", 10), tiny_tokenizer, 256, tiny_tokenizer.eos_token),
                  tiny_tokenizer.pad_token_id, "cpu", 4).mean().item()
    assert abs(mean) < (1e-4 if dtype == torch.float32 else 0.05) * max(1.0, abs(centering["reference_mean_before"]))
    assert json.loads((result.output_dir / "eval.json").read_text())["after"]["centering"] == pytest.approx(centering)
    assert f"Centered on the reference completions of `{references}`" in (result.output_dir / "README.md").read_text()


def test_centering_a_head_without_a_bias_is_refused_before_training(tmp_path, tiny_tokenizer):
    base = _saved(tmp_path, "llama", tiny_tokenizer)
    with pytest.raises(ValueError, match=r"center_rewards_dataset: LlamaForSequenceClassification has no bias .* "
                                         r"use center_rewards_coefficient"):
        reward_model(rm_config(base, tmp_path / "rm", center_rewards_dataset="rloo:tldr", max_length=256))
    assert not (tmp_path / "rm" / "model.safetensors").exists()

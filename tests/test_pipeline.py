"""The rloo_tldr recipe's four stages on tiny models, each folder feeding the next: rloo sft -> rloo
reward-model (started from the SFT folder) -> rloo train (the SFT policy against that reward model) ->
rloo eval --judge (the RL policy against the SFT policy, the reward model judging)."""

from __future__ import annotations

import json

from transformers import AutoConfig

from rloo import reward_model, sft, train

from test_judge import rloo_eval
from test_reward_model import rm_config
from test_sft_train import sft_config
from test_train_e2e import tiny_config


def test_sft_then_reward_model_then_rloo_then_a_judged_win_rate(tiny_model_dir, tmp_path):
    supervised = sft(sft_config(tiny_model_dir, tmp_path / "sft", max_steps=6, num_eval_samples=8)).output_dir
    rewarder = reward_model(rm_config(supervised, tmp_path / "rm", max_steps=4, num_eval_samples=8)).output_dir
    assert AutoConfig.from_pretrained(rewarder).num_labels == 1
    policy = train(tiny_config(supervised, tmp_path / "rl", reward_model_name_or_path=str(rewarder), reward_funcs=[],
                               reward_weights=None, max_steps=2, num_eval_samples=0)).output_dir
    judged = rloo_eval("--model", str(policy), "--against", str(supervised), "--dataset", "rloo:tldr",
                       "--num_samples", "8", "--judge", f"reward-model:{rewarder}", "--max_completion_length", "16")
    assert judged.returncode == 0, judged.stderr[-2000:]
    result = json.loads(judged.stdout.splitlines()[-1])
    assert result["num_pairs"] == 8 and result["n"] == 8 and result["unparseable"] == 0
    assert result["wins"] + result["losses"] + result["ties"] + result["inconsistent"] == 8
    assert 0.0 <= result["win_rate"] <= 1.0 and result["against"] == str(supervised)
    assert result["decoding"]["max_new_tokens"] == 16
    # an sft folder (its config.yaml holds SFTConfig's fields) against the references: the default preset's eval
    references = rloo_eval("--model", str(supervised), "--dataset", "rloo:tldr", "--num_samples", "4",
                           "--judge", f"reward-model:{rewarder}", "--max_completion_length", "8")
    assert references.returncode == 0, references.stderr[-2000:]
    assert json.loads(references.stdout.splitlines()[-1])["against"] == "references"


def test_the_public_functions_stay_functions_after_their_modules_are_imported():
    import importlib

    import rloo

    for module in ("rloo.sft_stage", "rloo.reward_stage", "rloo.held_out", "rloo.trainer"):
        importlib.import_module(module)
    from rloo import evaluate, reward_model, sft, train

    assert all(callable(f) and not isinstance(f, type(rloo)) for f in (evaluate, reward_model, sft, train))

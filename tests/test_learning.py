"""The embedded default learns: `tldr-tiny` as shipped, held-out reward before vs after (paired, 200 prompts).

This is the slow test of the default suite (about 2 minutes with the cached starting policy, plus about
2 minutes the first time, when the policy is built).
"""

from __future__ import annotations

import math

import torch

from rloo import load_config, train


def paired(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean per-prompt difference and its standard error."""
    diff = torch.tensor(after) - torch.tensor(before)
    return diff.mean().item(), (diff.std() / math.sqrt(len(diff))).item()


def test_tldr_tiny_default_learns(tmp_path):
    result = train(load_config("tldr-tiny", {"output_dir": str(tmp_path / "run"), "disable_tqdm": True}))
    before, after = result.eval_before, result.eval_after
    assert before["num_prompts"] == after["num_prompts"] == 200
    gain, se = paired(before["per_prompt_rewards"], after["per_prompt_rewards"])
    assert gain >= 3 * se, f"held-out reward {before['reward_mean']:.4f} -> {after['reward_mean']:.4f}, gain {gain:.4f} < 3 s.e. ({se:.4f})"
    rouge_gain, rouge_se = paired(before["per_prompt_rewards_by_source"]["rouge_l"],
                                  after["per_prompt_rewards_by_source"]["rouge_l"])
    assert rouge_gain >= -2 * rouge_se, f"ROUGE-L fell by {-rouge_gain:.4f} (> 2 s.e. = {2 * rouge_se:.4f})"
    steps = result.metrics
    assert len(steps) == 80 and all(math.isfinite(s["loss"]) and math.isfinite(s["kl"]) for s in steps)

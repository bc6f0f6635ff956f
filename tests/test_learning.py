"""The embedded default learns: `tldr-tiny` as shipped, held-out reward before vs after (paired, 200 prompts).

This is the slow test of the default suite (about 2 minutes with the cached starting policy, plus about
2 minutes the first time, when the policy is built).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from rloo import load_config, train
from rloo.cli import main
from test_report import check_in_browser, needs_chromium


def paired(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean per-prompt difference and its standard error."""
    diff = torch.tensor(after) - torch.tensor(before)
    return diff.mean().item(), (diff.std() / math.sqrt(len(diff))).item()


@pytest.fixture(scope="module")
def tldr_tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tldr-tiny") / "run"
    return train(load_config("tldr-tiny", {"output_dir": str(out), "disable_tqdm": True}))


def test_tldr_tiny_default_learns(tldr_tiny_run):
    result = tldr_tiny_run
    before, after = result.eval_before, result.eval_after
    assert before["num_prompts"] == after["num_prompts"] == 200
    gain, se = paired(before["per_prompt_rewards"], after["per_prompt_rewards"])
    assert gain >= 3 * se, f"held-out reward {before['reward_mean']:.4f} -> {after['reward_mean']:.4f}, gain {gain:.4f} < 3 s.e. ({se:.4f})"
    rouge_gain, rouge_se = paired(before["per_prompt_rewards_by_source"]["rouge_l"],
                                  after["per_prompt_rewards_by_source"]["rouge_l"])
    assert rouge_gain >= -2 * rouge_se, f"ROUGE-L fell by {-rouge_gain:.4f} (> 2 s.e. = {2 * rouge_se:.4f})"
    steps = result.metrics
    assert len(steps) == 80 and all(math.isfinite(s["loss"]) and math.isfinite(s["kl"]) for s in steps)


def test_the_tldr_tiny_policy_is_an_rloo_sft_run(tldr_tiny_run):
    """The starting policy was built by `rloo sft` from a random-init base: its folder is that command's run
    folder, and the supervised run lowered the held-out completion loss."""
    policy = Path(tldr_tiny_run.config.model_name_or_path)
    assert policy.name.startswith("tldr-tiny-sft-")
    figures = json.loads((policy / "eval.json").read_text())
    assert figures["after"]["loss"] < figures["before"]["loss"] - 2.0, figures
    assert "(`rloo sft`)" in (policy / "README.md").read_text()
    made = yaml.safe_load((policy / "config.yaml").read_text())
    assert Path(made["model_name_or_path"]).name.startswith("tldr-tiny-base-") and made["dataset_name"] == "rloo:tldr"


@needs_chromium
def test_the_tldr_tiny_report_renders_offline_in_chromium(tldr_tiny_run):
    """The finished default run's report (written at its end, and again by `rloo report`)."""
    out = tldr_tiny_run.output_dir
    written = (out / "report.html").read_bytes()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_bytes() == written  # the same page: nothing in it depends on when it is made
    check_in_browser(out / "report.html")

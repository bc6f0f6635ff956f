"""CPU end to end on a tiny random model: a 2-step run, its folder, the CLI verbs, and plumbing invariances."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rloo import RLOOConfig, train
from rloo.data import load_prompt_dataset

RUN_FILES = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "config.yaml", "metrics.jsonl", "README.md", "eval.json"]
STEP_KEYS = ["reward", "reward_std", "kl", "entropy", "completion_length", "frac_reward_zero_std", "episodes_per_s",
             "learning_rate", "grad_norm", "memory/generate", "memory/score", "memory/reference", "memory/update"]


def tiny_config(model_dir: Path, output_dir: Path, **overrides) -> RLOOConfig:
    values = dict(
        model_name_or_path=str(model_dir), dataset_name="rloo:tldr", dataset_eval_split="validation",
        max_prompt_length=64, num_eval_samples=4,
        num_generations=2, max_completion_length=8, reward_funcs=["grounding", "summary_length"],
        reward_weights=[1.0, 0.5], beta=0.05, learning_rate=1e-2, per_device_train_batch_size=4, max_steps=2,
        seed=0, output_dir=str(output_dir), disable_tqdm=True, bf16=False,  # float32 on a GPU too (TRL's default: bf16)
        gradient_checkpointing=False,  # its own tests turn it on (test_gradient_checkpointing_*): 5% of the suite's time
    )
    values.update(overrides)
    return RLOOConfig(**values)


def test_two_steps_change_parameters_and_write_a_complete_run_folder(tiny_model_dir, tmp_path):
    before = load_file(tiny_model_dir / "model.safetensors")
    result = train(tiny_config(tiny_model_dir, tmp_path / "run"))
    out = result.output_dir
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "eval/reward" not in line]
    assert [s["step"] for s in steps] == [1, 2]
    assert [line["step"] for line in lines if "eval/reward" in line] == [0, 2]  # before and after training
    for key in STEP_KEYS + ["rewards/grounding", "rewards/summary_length"]:
        assert all(key in s for s in steps), key
        assert all(s[key] == s[key] for s in steps), f"{key} is NaN"
    saved = (out / "config.yaml").read_text()
    assert f"model_name_or_path: {tiny_model_dir}" in saved
    assert result.eval_before["num_prompts"] == result.eval_after["num_prompts"] == 4


def test_model_card_quick_start_runs_as_written(tiny_model_dir, tmp_path):
    """From the folder's parent without a hub id; with one, from the Hub (here its cache, offline) by that id."""
    result = train(tiny_config(tiny_model_dir, tmp_path / "run", max_steps=1))
    out = result.output_dir
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "pipeline(\"text-generation\"" in code and f"model={out.name!r}" in code
    assert str(tiny_model_dir) not in card and str(out.parent) not in card  # no local paths
    assert "a local model (`" + tiny_model_dir.name + "`)" in card
    assert re.search(r"```bash\nrloo train .*--max_steps 1 .*--output_dir run\n```", card)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=out.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    for needle in ("RLOO", "Ahmadian", "Stiennon", "transformers", "num_generations", "![reward](plots/reward.png)"):
        assert needle in card
    assert (out / "plots" / "reward.png").is_file()

    from rloo.card import model_card
    from transformers import AutoTokenizer

    sources = SimpleNamespace(names=["grounding", "summary_length"], weights=[1.0, 0.5])
    hub_card = model_card(result.config, "someone/sft-policy", sources, None, "TL;DR: a prompt",
                          AutoTokenizer.from_pretrained(out), out, hub_repo="someone/rloo-tiny",
                          tracker_links={"Weights & Biases": "https://wandb.ai/someone/huggingface/runs/abc123",
                                         "Trackio": "https://huggingface.co/spaces/someone/trackio"})
    assert "base_model: someone/sft-policy" in hub_card and "# Model card for rloo-tiny" in hub_card
    assert "Visualize in Weights & Biases" in hub_card and "(https://wandb.ai/someone/huggingface/runs/abc123)" in hub_card
    assert "[Visualize in Trackio](https://huggingface.co/spaces/someone/trackio)" in hub_card
    hub_code = re.search(r"```python\n(.*?)```", hub_card, re.S).group(1)
    assert "model='someone/rloo-tiny'" in hub_code and "Run it from the directory" not in hub_card
    snapshot = tmp_path / "hub" / "models--someone--rloo-tiny" / "snapshots" / ("0" * 40)  # the Hub cache's layout
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).write_bytes((out / name).read_bytes())
    done = subprocess.run([sys.executable, "-c", hub_code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_python_api_accepts_model_object_dataset_and_callable_rewards(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []

    def prefers_short(prompts, completions, **kwargs):
        calls.append(sorted(kwargs))
        return [-float(len(c)) for c in completions]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset = load_prompt_dataset("rloo:tldr").select(range(16))
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", reward_weights=None, model_name_or_path="rloo:tldr-tiny-sft")
    result = train(cfg, model=model, tokenizer=tokenizer, rewards=[prefers_short], train_dataset=dataset)
    # A dataset object has no held-out split: no evaluation on some other dataset's prompts.
    assert result.eval_before is None and len(result.metrics) == 2
    assert f"model_name_or_path: {tiny_model_dir}" in (result.output_dir / "config.yaml").read_text()
    assert "completion" in calls[0] and "truncated" in calls[0] and "completion_ids" in calls[0]
    assert "rewards/prefers_short" in result.metrics[0]


def test_gradient_accumulation_equals_one_large_batch(tiny_model_dir, tmp_path):
    # Adam's first step is lr * g / (|g| + eps): with the default eps 1e-8 an element whose gradient is ~1e-8
    # turns float32 summation-order noise (~1e-11) into an update change of ~lr * 1e-3. eps 1e-3 keeps the
    # update smooth in g (lr / eps = 1), so parameters within 1e-6 mean gradients within ~1e-6.
    common = dict(num_eval_samples=0, max_steps=1, beta=0.05, max_grad_norm=0.0, learning_rate=1e-3,
                  adam_epsilon=1e-3)
    big = train(tiny_config(tiny_model_dir, tmp_path / "a", per_device_train_batch_size=8,
                            gradient_accumulation_steps=1, **common))
    small = train(tiny_config(tiny_model_dir, tmp_path / "b", per_device_train_batch_size=2,
                              gradient_accumulation_steps=4, **common))
    a, b = load_file(big.output_dir / "model.safetensors"), load_file(small.output_dir / "model.safetensors")
    assert big.metrics[0]["reward"] == pytest.approx(small.metrics[0]["reward"], abs=1e-6)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", [0.05, 0.0])
def test_micro_batches_that_cut_through_prompt_groups_equal_whole_groups(tiny_model_dir, tmp_path, beta):
    """TRL's batch rule: a micro-batch may hold part of a prompt group. With k = 4 and micro-batches of 2
    completions (half a group, 4 accumulated: one generation batch of 2 prompts), the leave-one-out baseline and
    the KL are taken over the whole generation batch before the update; the run equals the one whose
    micro-batches hold the whole groups (same samples and rewards, parameters within 1e-6 after 2 steps)."""
    common = dict(num_eval_samples=0, max_steps=2, beta=beta, max_grad_norm=0.0, learning_rate=1e-3,
                  adam_epsilon=1e-3, num_generations=4)
    whole = train(tiny_config(tiny_model_dir, tmp_path / "a", per_device_train_batch_size=8,
                              gradient_accumulation_steps=1, **common))
    halves = train(tiny_config(tiny_model_dir, tmp_path / "b", per_device_train_batch_size=2,
                               gradient_accumulation_steps=4, **common))
    uneven = train(tiny_config(tiny_model_dir, tmp_path / "c", per_device_train_batch_size=8, generation_batch_size=8,
                               gradient_accumulation_steps=1, **common))  # the same batch named by TRL's field
    a, b, c = (load_file(r.output_dir / "model.safetensors") for r in (whole, halves, uneven))
    for step in range(2):
        assert whole.metrics[step]["reward"] == pytest.approx(halves.metrics[step]["reward"], abs=1e-6)
        assert whole.metrics[step]["kl"] == pytest.approx(halves.metrics[step]["kl"], abs=1e-6)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
        assert torch.equal(a[key], c[key])


def test_one_generation_batch_serves_steps_per_generation_optimizer_steps(tiny_model_dir, tmp_path):
    """steps_per_generation = 2 x gradient_accumulation_steps: each generation batch (here 4 prompts of k = 2) is
    trained on in 2 optimizer steps, half of it each; the second trains on samples of the policy before the
    first (the sampling policy's log-probs, taken up front, give the clipped ratio its old side)."""
    def token_reward(completion_ids, **kwargs):  # differs between any two different completions
        return [float(sum(ids) % 17) + len(ids) for ids in completion_ids]

    result = train(tiny_config(tiny_model_dir, tmp_path / "run", per_device_train_batch_size=4, steps_per_generation=2,
                               num_eval_samples=0, max_steps=4, learning_rate=1e-2, reward_weights=None),
                   rewards=[token_reward])
    m = result.metrics
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    assert "time/generate" in m[0] and "time/generate" not in m[1] and "time/generate" in m[2]  # one batch per 2 steps
    assert m[0]["reward"] == m[1]["reward"] and m[2]["reward"] == m[3]["reward"]  # both steps report their batch
    assert all(round(x["episodes_per_s"] * x["step_seconds"]) == 4 for x in m)  # the completions each step trained on
    assert all(x["grad_norm"] for x in m)
    # Whole groups in each half, so sum(A) = 0 there: the loss is 0 exactly when every ratio is 1. It is in the
    # first half (nothing updated yet) and is not in the second (sampled before step 1's update).
    assert abs(m[0]["loss"]) < 1e-6 and abs(m[1]["loss"]) > 1e-6


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rloo", *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "RLOO_CACHE": str(cwd / "cache")})


def test_cli_train_eval_generate(tiny_model_dir, tmp_path):
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text("def mentions_post(prompts, completions, **kw):\n    return [1.0 if 'I' in c else 0.0 for c in completions]\n")
    done = run_cli("train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", "rloo:tldr",
                   "--dataset_test_split", "validation", "--max_steps", "2", "--num_generations", "2",
                   "--per_device_train_batch_size", "4", "--max_completion_length", "8", "--max_prompt_length", "64",
                   "--reward_funcs", "grounding", f"{reward_file}:mentions_post", "--reward_weights", "1", "0.5",
                   "--num_eval_samples", "4", "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out reward on 4 validation prompts: before" in done.stdout
    assert "step 2/2 reward" in done.stdout  # metrics on stdout when the progress bar is off
    # A run that names its own model, data and rewards starts from the library defaults (TRL's), not tldr-tiny's,
    # and says where each value came from.
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["learning_rate"] == 1e-6 and saved["beta"] == 0.05 and saved["lr_scheduler_type"] == "linear"
    assert saved["reward_funcs"] == ["grounding", f"{reward_file}:mentions_post"] and saved["preset"] is None
    assert "flag: model_name_or_path=" in done.stderr and "default: " in done.stderr and "preset tldr-tiny:" not in done.stderr
    done = run_cli("eval", "--model", str(tmp_path / "run"), "--num_samples", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("reward_mean", "reward_std", "rewards/grounding", "rewards/mentions_post", "completion_length_mean"):
        assert isinstance(result[key], float)
    assert result["num_prompts"] == 3
    done = run_cli("generate", "--model", str(tmp_path / "run"), "--max_new_tokens", "5", "--num_generations", "2",
                   "SUBREDDIT: r/test\n\nTITLE: hi\n\nPOST: my cat\n\nTL;DR:", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("---") == 2


def test_eval_of_a_folder_without_a_config_needs_a_dataset(tiny_model_dir, capsys):
    from rloo.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--reward_funcs", "grounding"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rloo eval: error: --dataset: name the held-out prompts (this model's config names no dataset_name)")


def test_cli_errors_are_one_line(tmp_path):
    done = run_cli("train", "--num_generations", "1", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "rloo train: error: num_generations must be >= 2 (the leave-one-out baseline needs a sibling)")
    done = run_cli("train", "--config", "tldr-pythia-1b", "--max_steps", "1", cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "trl-lib/tldr" in last and "Hugging Face Hub is unreachable" in last


def test_gradient_checkpointing_run_matches_plain_run(tiny_model_dir, tmp_path):
    """Checkpointing keeps the shared prompt and recomputes what the plain pass computes: the same weights."""
    common = dict(num_eval_samples=0, max_steps=2, learning_rate=1e-3)
    plain = train(tiny_config(tiny_model_dir, tmp_path / "a", gradient_checkpointing=False, **common))
    checkpointed = train(tiny_config(tiny_model_dir, tmp_path / "b", gradient_checkpointing=True, **common))
    a, b = load_file(plain.output_dir / "model.safetensors"), load_file(checkpointed.output_dir / "model.safetensors")
    assert [m["reward"] for m in plain.metrics] == [m["reward"] for m in checkpointed.metrics]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_beta_zero_skips_the_reference_and_warmup_schedules_the_learning_rate(tiny_model_dir, tmp_path):
    result = train(tiny_config(tiny_model_dir, tmp_path / "run", beta=0.0, num_eval_samples=0, max_steps=2,
                               lr_scheduler_type="constant", warmup_ratio=0.5))
    assert [m["kl"] for m in result.metrics] == [0.0, 0.0]
    # warm-up over 1 of 2 steps: the first step runs at lr 0, the second at the peak
    assert [m["learning_rate"] for m in result.metrics] == [0.0, pytest.approx(1e-2)]


def test_reused_generation_batch_with_normalised_advantages_and_k3(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", num_iterations=2, normalize_advantages=True,
                      kl_estimator="k3", num_eval_samples=0, max_steps=2)
    result = train(cfg)
    first, second = result.metrics
    assert first["reward"] == second["reward"]  # step 2 trains on the batch sampled for step 1
    assert first["clip_ratio"] == 0.0 and abs(first["loss"]) < 1e-6  # fresh batch: ratio exactly 1
    assert abs(second["loss"]) > 1e-6  # after one update the ratio moved away from 1
    assert first["kl"] >= 0 and second["kl"] >= 0  # k3 is never negative
    assert cfg.sizes is None and result.config.sizes.max_steps == 2  # the caller's config is left as it was


def test_dataset_without_the_eval_split_trains_without_evaluation(tiny_model_dir, tmp_path):
    from datasets import DatasetDict

    folder = tmp_path / "prompts"
    DatasetDict({"train": load_prompt_dataset("rloo:tldr").select(range(12))}).save_to_disk(str(folder))
    result = train(tiny_config(tiny_model_dir, tmp_path / "run", dataset_name=str(folder), num_eval_samples=4))
    assert result.eval_before is None and len(result.metrics) == 2
    assert (result.output_dir / "model.safetensors").is_file()


def test_masked_truncated_completions_do_not_train(tiny_model_dir, tmp_path):
    # A random 512-token model almost never emits EOS within 8 tokens: every completion is truncated.
    result = train(tiny_config(tiny_model_dir, tmp_path / "run", mask_truncated_completions=True,
                               num_eval_samples=0, max_steps=1))
    assert result.metrics[0]["frac_truncated"] == 1.0
    assert result.metrics[0]["grad_norm"] == 0.0


def test_sharing_the_prompt_prefix_changes_no_result(tiny_model_dir, tiny_policy_reward_model_dir, tmp_path):
    """DESIGN.md §3 at run level: with the prompt run once per group (on) or k times (off) in generation,
    the log-prob passes and the reward model (which scores the policy's ids: same vocabulary), two steps
    sample the same completions and give the same rewards, KL, advantages and parameters."""
    runs = {}
    for share in (True, False):
        runs[share] = train(tiny_config(tiny_model_dir, tmp_path / str(share), share_prompt_prefix=share,
                                        num_eval_samples=0, max_steps=2, learning_rate=1e-3, temperature=0.7,
                                        reward_model_name_or_path=str(tiny_policy_reward_model_dir),
                                        reward_weights=[1.0, 0.5, 1.0]))
    assert runs[True].metrics[0]["rewards/reward_model"] != 0.0
    for on, off in zip(runs[True].metrics, runs[False].metrics):
        for key in ("reward", "rewards/grounding", "rewards/reward_model", "completion_length", "advantage_abs_mean",
                    "kl"):
            assert on[key] == pytest.approx(off[key], abs=1e-5), key
    a = load_file(runs[True].output_dir / "model.safetensors")
    b = load_file(runs[False].output_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)

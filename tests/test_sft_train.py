"""``rloo sft`` end to end on tiny real models: it lowers the held-out completion loss on the bundled TL;DR
pairs, writes a run folder whose card's quick start runs, resumes bit-identically across an epoch boundary,
refuses a resume that differs, and has TRL's SFTConfig defaults wherever TRL has the field."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from rloo.errors import CheckpointError
from rloo.sft_stage import sft
from rloo.sft_config import SFTConfig

from test_sft import tldr_rows

# rloo's defaults that differ from TRL's SFTConfig on purpose (README, "Coming from TRL")
DIFFERENT_ON_PURPOSE = {
    "save_total_limit": "rloo keeps the newest 2 checkpoints (TRL: all)",
    "eval_on_start": "rloo measures the held-out loss before training, for the card's before / after",
    "report_to": "the same 'none', as a list",
    "disable_tqdm": "the same: TRL's None is resolved to false",
}


def sft_config(model_dir, out, **overrides) -> SFTConfig:
    values = dict(model_name_or_path=str(model_dir), dataset_name="rloo:tldr", dataset_eval_split="validation",
                  num_eval_samples=20, per_device_train_batch_size=4, max_steps=4, learning_rate=3e-3,
                  output_dir=str(out), disable_tqdm=True, gradient_checkpointing=False, logging_steps=1, seed=0)
    return SFTConfig(**{**values, **overrides})


def test_defaults_are_trls_sft_config_where_it_has_the_field():
    from trl import SFTConfig as TRLSFTConfig

    theirs = {}
    for f in dataclasses.fields(TRLSFTConfig):
        if f.default is not dataclasses.MISSING:
            theirs[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            theirs[f.name] = f.default_factory()
    ours = SFTConfig().to_dict()
    shared = [name for name in ours if name in theirs]
    differ = {name for name in shared if ours[name] != theirs[name]}
    assert len(shared) >= 45 and {"learning_rate", "max_length", "completion_only_loss", "logging_steps"} <= set(shared)
    assert differ <= set(DIFFERENT_ON_PURPOSE), differ - set(DIFFERENT_ON_PURPOSE)
    assert SFTConfig().learning_rate == 2e-5 and SFTConfig().max_length == 1024 and SFTConfig().logging_steps == 10


def test_sft_lowers_the_held_out_completion_loss_and_writes_a_run_folder(tiny_model_dir, tmp_path, monkeypatch):
    result = sft(sft_config(tiny_model_dir, tmp_path / "sft", max_steps=20, per_device_train_batch_size=8,
                            num_eval_samples=50))
    before, after = result.eval_before["loss"], result.eval_after["loss"]
    assert after < before - 0.3, (before, after)  # random init: log(512) = 6.24 nats a token at the start
    out = result.output_dir
    assert json.loads((out / "eval.json").read_text())["after"]["loss"] == pytest.approx(after)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert rows[0]["eval/loss"] == pytest.approx(before) and rows[-1]["eval/loss"] == pytest.approx(after)
    card = (out / "README.md").read_text()
    assert "rloo sft" in card and f"{after:.4f}" in card and not (out / "completions.jsonl").exists()
    snippet = card.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)  # the quick start loads the folder by its name
    exec(compile(snippet, "quick start", "exec"), {})
    from rloo.checkpoint import committed_checkpoints

    assert [p.name for p in committed_checkpoints(out)] == ["step-000020"]  # the final state, as rloo train keeps it


def test_sft_resumes_bit_identically_across_an_epoch_boundary(tiny_model_dir, tmp_path):
    """20 training rows, 8 a step: epochs end inside steps 3 and 5; stopped after step 3, resumed to 6."""
    train_rows = Dataset.from_list(tldr_rows(20))
    settings = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, lr_scheduler_type="constant",
                    save_steps=3, num_eval_samples=8)
    full = sft(sft_config(tiny_model_dir, tmp_path / "full", max_steps=6, **settings), train_dataset=train_rows)
    sft(sft_config(tiny_model_dir, tmp_path / "part", max_steps=3, **settings), train_dataset=train_rows)
    resumed = sft(sft_config(tiny_model_dir, tmp_path / "part", max_steps=6, resume_from_checkpoint="latest",
                             **settings), train_dataset=train_rows)
    a, b = load_file(full.output_dir / "model.safetensors"), load_file(resumed.output_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in full.metrics] == [m["loss"] for m in resumed.metrics]
    assert resumed.eval_before == full.eval_before and resumed.eval_after == full.eval_after
    assert [m["epoch"] for m in full.metrics][2] > 1.0  # the data order did cross an epoch
    with pytest.raises(CheckpointError, match=r"differs from it in per_device_train_batch_size 4 -> 2"):
        sft(sft_config(tiny_model_dir, tmp_path / "part", max_steps=6, resume_from_checkpoint="latest",
                       **{**settings, "per_device_train_batch_size": 2}), train_dataset=train_rows)


def test_the_cli_trains_and_refuses_in_one_line(tiny_model_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "rloo", "sft", "--model_name_or_path", str(tiny_model_dir), "--dataset_name",
            "rloo:tldr", "--dataset_eval_split", "validation", "--num_eval_samples", "6", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--gradient_checkpointing", "false", "--disable_tqdm"]
    done = subprocess.run([*base, "--output_dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out loss" in done.stdout and (tmp_path / "run" / "model.safetensors").is_file()
    refused = subprocess.run([*base, "--output_dir", str(tmp_path / "other"), "--packing", "true"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
        "rloo sft: error: packing: rloo sft does not pack rows yet; set packing false")
    assert not (tmp_path / "other").exists()


def test_two_processes_train_as_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    """torchrun, 2 processes (gloo) of 2 rows a micro-batch against 1 process of 4: each step's rows split, its
    loss over all of their trained tokens, the gradients averaged: the same weights."""
    from test_distributed import free_port

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", "rloo:tldr", "--num_eval_samples", "0",
              "--max_steps", "3", "--learning_rate", "3e-3", "--gradient_checkpointing", "false", "--disable_tqdm",
              "--save_steps", "0", "--max_length", "400"]
    runs = {}
    for processes, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"p{processes}"
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port())]
        done = subprocess.run([sys.executable, *launcher, "-m", "rloo", "sft", *common, "--per_device_train_batch_size",
                               str(batch), "--output_dir", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[processes] = load_file(out / "model.safetensors")
    assert max((runs[1][k] - runs[2][k]).abs().max().item() for k in runs[1]) <= 1e-5
    assert any(not torch.equal(runs[1][k], load_file(tiny_model_dir / "model.safetensors")[k]) for k in runs[1])

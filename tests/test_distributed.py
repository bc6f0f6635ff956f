"""Several processes (torchrun, gloo on CPU) equal one: the same parameters, rewards and run folder.

Each prompt's samples depend only on (seed, step, dataset row) (generation.prompt_seeds), so two
processes that split a global batch sample what one process with the whole batch samples; DDP
averages their gradients, each process's loss being its share of the step's sequences.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rloo import train
from rloo.checkpoint import committed_checkpoints
from test_train_e2e import tiny_config

COMMON = dict(num_eval_samples=0, max_steps=3, learning_rate=1e-3, temperature=0.9, save_steps=0)


def cli_args(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        args += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(num_processes: int, model_dir: Path, out: Path, *, launcher: list[str] | None = None,
             **overrides) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m rloo train`` with tiny_config's values (per process batch);
    ``launcher``: another launch command before ``-m rloo train`` (``accelerate launch ...``)."""
    cfg = tiny_config(model_dir, out, **{**COMMON, **overrides})
    values = {k: v for k, v in cfg.to_dict().items() if v is not None and k not in ("preset",)}
    launcher = launcher or ["-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
                            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, *launcher, "-m", "rloo", "train", *cli_args(values)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def accelerate_launch(config: str, num_processes: int) -> list[str]:
    """The launcher for ``accelerate launch --config_file configs/accelerate/<config>.yaml``."""
    path = Path(__file__).parents[1] / "configs" / "accelerate" / f"{config}.yaml"
    return ["-m", "accelerate.commands.launch", "--config_file", str(path), "--num_processes", str(num_processes),
            "--main_process_port", str(free_port())]


def rewards_of(run: Path) -> list[dict]:
    keys = ("step", "reward", "reward_std", "rewards/grounding", "rewards/summary_length", "completion_length",
            "num_truncated_prompts", "advantage_abs_mean")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: line[k] for k in keys} for line in lines if "eval/reward" not in line]


def tensorboard_rewards(run: Path) -> list[tuple[int, float]]:
    """train/reward at each step, from the run's one TensorBoard events file (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run / "runs").glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # one process wrote it
    return [(e.step, e.value) for e in EventAccumulator(str(files[0])).Reload().Scalars("train/reward")]


def completions_of(run: Path) -> list[tuple]:
    """Every logged completion as (step, prompt, completion), in a fixed order (processes gather by rank)."""
    rows = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    return sorted((row["step"], row["prompt"], row["completion"]) for row in rows)


def max_difference(a: Path, b: Path) -> float:
    name = "adapter_model.safetensors" if (a / "adapter_model.safetensors").is_file() else "model.safetensors"
    x, y = load_file(a / name), load_file(b / name)
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


# The second variant also trains LoRA adapters (one adapter over the processes, DDP averaging its gradients) with
# gradient checkpointing on (each process's layers replay against its own prompts' cache).
LORA = dict(use_peft=True, lora_r=4, learning_rate=5e-2, gradient_checkpointing=True)


@pytest.mark.parametrize("normalize, variant", [(False, {}), (True, LORA)], ids=["plain", "normalized-lora-checkpointed"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path, normalize, variant):
    """normalize_advantages: over the step's whole batch, whatever the layout."""
    evaluation = dict(num_eval_samples=7) if normalize else {}  # held-out prompts split 4 + 3 over the processes
    logging = dict(report_to=["tensorboard"], log_completions=True)  # only process 0 logs
    one = train(tiny_config(tiny_model_dir, tmp_path / "one", per_device_train_batch_size=8,
                            normalize_advantages=normalize, **{**COMMON, **evaluation, **logging, **variant})).output_dir
    two = tmp_path / "two"
    # 2 processes x 2 micro-batches (gradients averaged across processes after the second) x 1 group
    torchrun(2, tiny_model_dir, two, per_device_train_batch_size=2, gradient_accumulation_steps=2,
             normalize_advantages=normalize, **evaluation, **logging, **variant)
    assert max_difference(one, two) <= 1e-5
    for a, b in zip(rewards_of(one), rewards_of(two), strict=True):  # 3 lines each: written once
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert completions_of(one) == completions_of(two)  # every process's completions, gathered once
    (steps_one, rewards_one), (steps_two, rewards_two) = (zip(*tensorboard_rewards(run)) for run in (one, two))
    assert steps_one == steps_two == (1, 2, 3) and rewards_one == pytest.approx(rewards_two, abs=1e-6)
    if evaluation:
        a, b = (json.loads((run / "eval.json").read_text()) for run in (one, two))
        assert b["num_prompts"] == 7 and a["samples"] == b["samples"]  # the texts gathered from both shares
        for key in ("reward_before", "reward_after", "gain"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_two_process_checkpoint_resumes_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Inside a reused generation batch (num_iterations 2, checkpoint at step 3): each process's RNG and
    batch come back from its own part of the checkpoint."""
    settings = dict(per_device_train_batch_size=4, num_iterations=2, save_steps=1, lr_scheduler_type="constant")
    full = tmp_path / "full"
    torchrun(2, tiny_model_dir, full, max_steps=4, **settings)
    part = tmp_path / "part"
    torchrun(2, tiny_model_dir, part, max_steps=3, **settings)
    latest = committed_checkpoints(part)[-1]
    assert latest.name == "step-000003"
    assert (latest / "rollout-rank0.safetensors").is_file() and (latest / "rollout-rank1.safetensors").is_file()
    torchrun(2, tiny_model_dir, part, max_steps=4, resume_from_checkpoint="latest", **settings)
    assert max_difference(full, part) == 0.0
    for a, b in zip(load_file(committed_checkpoints(full)[-1] / "optimizer.safetensors").items(),
                    load_file(committed_checkpoints(part)[-1] / "optimizer.safetensors").items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert rewards_of(full) == rewards_of(part)


def test_a_reward_error_on_one_process_stops_every_process_with_a_checkpoint(tiny_model_dir, tmp_path):
    reward = tmp_path / "rank1_fails.py"
    reward.write_text(
        "import os\n"
        "CALLS = []\n"
        "def fn(prompts, completions, **kwargs):\n"
        "    CALLS.append(1)\n"
        "    if len(CALLS) >= 2 and os.environ.get('RANK') == '1':\n"
        "        raise RuntimeError('rank 1 cannot score this')\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    out = tmp_path / "run"
    with pytest.raises(AssertionError) as info:  # torchrun fails: both processes exit with an error
        torchrun(2, tiny_model_dir, out, per_device_train_batch_size=4, reward_funcs=[f"{reward}:fn"],
                 reward_weights=None, save_steps=0)
    assert "rank 1 cannot score this" in str(info.value) and "another process" in str(info.value)
    assert committed_checkpoints(out)[-1].name == "step-000001"  # the state before the failing step 2


def test_fsdp_config_on_cpus_is_refused_in_one_line(tiny_model_dir, tmp_path):
    """accelerate runs FSDP only on GPUs and would silently run DDP here: rloo says so instead."""
    with pytest.raises(AssertionError) as info:
        torchrun(2, tiny_model_dir, tmp_path / "run", launcher=accelerate_launch("fsdp", 2), per_device_train_batch_size=4)
    assert "rloo train: error: accelerate config: FSDP runs on GPUs only" in str(info.value)
    assert not (tmp_path / "run").exists()

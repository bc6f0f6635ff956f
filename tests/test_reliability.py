"""Issue 4: checkpoints, exact resume, clean stops, and an answer to every bad input (docs/reliability.md).

Tiny random models on CPU; fault injection by monkeypatching rloo's own writers (in-process) or by
killing a training subprocess. "Bit-identical" means torch.equal on every parameter and optimizer
tensor and equal per-step metrics (wall-clock fields aside).
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rloo import checkpoint, train
from rloo.checkpoint import COMMIT_MARKER, committed_checkpoints
from rloo.errors import CheckpointError, NonFiniteTrainingError, RewardFunctionError, TrainingInterrupted
from test_train_e2e import tiny_config

CLOCK_KEYS = ("step_seconds", "episodes_per_s")


def cfg_for(model_dir: Path, out: Path | None, **overrides):
    values = dict(num_eval_samples=0, max_steps=4, learning_rate=1e-3, save_steps=2, temperature=0.9)
    values.update(overrides)
    cfg = tiny_config(model_dir, out, **values)
    if out is None:
        cfg.output_dir = None
    return cfg


def metrics_of(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in CLOCK_KEYS and not k.startswith(("time/", "memory/"))}
            for line in lines]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_run(full: Path, resumed: Path) -> None:
    """Final weights, the last checkpoint's optimizer state, and every step's metrics are identical."""
    assert_same_tensors(load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors"))
    last_full, last_resumed = committed_checkpoints(full)[-1], committed_checkpoints(resumed)[-1]
    assert last_full.name == last_resumed.name == "step-000004"
    for name in ("optimizer.safetensors", "rng.safetensors"):
        assert_same_tensors(load_file(last_full / name), load_file(last_resumed / name))
    assert metrics_of(full) == metrics_of(resumed)
    assert completions_of(full) == completions_of(resumed)  # none lost or repeated across the stop


def completions_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]


class StopAt:
    """A reward source (letter share of each completion) that sends SIGTERM to this process during its
    ``at``-th call, so a run stops after that step with a checkpoint, its config unchanged."""

    __name__ = "stop_at"

    def __init__(self, at: int | None, signum: int = signal.SIGTERM):
        self.at, self.signum, self.calls = at, signum, 0

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return [sum(ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]


# ------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("num_iterations, stop_at", [(1, 2), (2, 3)])
def test_resume_is_bit_identical(tiny_model_dir, tmp_path, num_iterations, stop_at):
    """N steps == k steps + stop + resume + (N - k) steps; with num_iterations=2 and k=3 the checkpoint
    falls inside a reused generation batch (step 4 reuses step 3's samples)."""
    settings = dict(num_iterations=num_iterations, save_steps=2, reward_weights=None)
    full = train(cfg_for(tiny_model_dir, tmp_path / "full", **settings), rewards=["grounding", StopAt(None)]).output_dir
    part = tmp_path / "part"
    generation_calls = (stop_at - 1) // num_iterations + 1  # the reward runs once per generation batch
    with pytest.raises(TrainingInterrupted):
        train(cfg_for(tiny_model_dir, part, **settings), rewards=["grounding", StopAt(generation_calls)])
    latest = committed_checkpoints(part)[-1]
    assert latest.name == f"step-{stop_at:06d}"
    state = json.loads((latest / "state.json").read_text())
    assert (state["ranks"][0]["rollout"] is not None) == (stop_at % num_iterations != 0)
    resumed = train(cfg_for(tiny_model_dir, part, resume_from_checkpoint="latest", **settings),
                    rewards=["grounding", StopAt(None)]).output_dir
    assert_same_run(full, resumed)


def test_resume_refuses_an_incompatible_run_listing_the_differences(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, run, max_steps=2))
    changed = cfg_for(tiny_model_dir, run, resume_from_checkpoint="latest", num_generations=4,
                      per_device_train_batch_size=8)
    with pytest.raises(CheckpointError) as info:
        train(changed)
    message = str(info.value)
    assert "num_generations 2 -> 4" in message and "per_device_train_batch_size 4 -> 8" in message
    assert "resume_ignore_mismatch" in message and "\n" not in message
    changed.resume_ignore_mismatch = True
    assert train(changed).output_dir == run


def test_resume_needs_a_committed_checkpoint(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="latest needs output_dir"):
        train(cfg_for(tiny_model_dir, None, resume_from_checkpoint="latest"))
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        train(cfg_for(tiny_model_dir, tmp_path / "empty", resume_from_checkpoint="latest"))
    half = tmp_path / "run" / "checkpoints" / "step-000002"
    half.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a committed rloo checkpoint"):
        train(cfg_for(tiny_model_dir, None, resume_from_checkpoint=str(half)))


# ---------------------------------------------------------------------------- atomic saves, rotation
def test_rotation_keeps_the_newest_and_discovery_ignores_uncommitted(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, run, max_steps=5, save_steps=1, save_total_limit=2))
    folder = run / "checkpoints"
    assert [p.name for p in committed_checkpoints(run)] == ["step-000004", "step-000005"]
    assert sorted(p.name for p in folder.iterdir()) == ["reference", "step-000004", "step-000005"]
    (folder / "step-000009").mkdir()  # a newer folder without COMMITTED: a save that never finished
    (folder / "step-000009" / "model.safetensors").write_bytes(b"partial")
    assert committed_checkpoints(run)[-1].name == "step-000005"
    marker = json.loads((folder / "step-000005" / COMMIT_MARKER).read_text())
    assert marker["step"] == 5 and "model.safetensors" in marker["files"]


# What the writers raise: safetensors reports a full disk as SafetensorError (seen with RLIMIT_FSIZE on
# Linux), a read-only folder fails in open() with OSError.
FAILURES = {
    "disk full": lambda name: SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                              'message: "No space left on device" })'),
    "read-only": lambda name: OSError(errno.EROFS, os.strerror(errno.EROFS), name),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_save_leaves_no_checkpoint_and_the_previous_intact(tiny_model_dir, tmp_path, monkeypatch, failure):
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, run, max_steps=2, save_steps=2, lr_scheduler_type="constant"))
    before = {p.name: sorted(q.name for q in p.iterdir()) for p in committed_checkpoints(run)}
    real_save_file = checkpoint.save_file

    def failing_save_file(tensors, filename, *args, **kwargs):
        if filename.endswith("rng.safetensors"):  # after the weights and the optimizer were written
            raise FAILURES[failure](filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(CheckpointError) as info:
        train(cfg_for(tiny_model_dir, run, resume_from_checkpoint="latest", max_steps=4, save_steps=2,
                      lr_scheduler_type="constant"))
    message = str(info.value)
    reason = "No space left on device" if failure == "disk full" else os.strerror(errno.EROFS)
    assert "step-000004" in message and reason in message and "step-000002" in message and "intact" in message
    assert "\n" not in message
    assert {p.name: sorted(q.name for q in p.iterdir()) for p in committed_checkpoints(run)} == before
    assert not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()
    train(cfg_for(tiny_model_dir, run, resume_from_checkpoint="latest", max_steps=4, save_steps=2,
                  lr_scheduler_type="constant"))
    assert committed_checkpoints(run)[-1].name == "step-000004"


# ------------------------------------------------------------------------------------- clean stops
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_resumes_exactly(tiny_model_dir, tmp_path, signum):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    settings = dict(save_steps=0, reward_weights=None)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg_for(tiny_model_dir, run, **settings), rewards=[StopAt(2, signum)])  # arrives mid-step 2
    assert info.value.step == 2 and info.value.checkpoint.name == "step-000002"
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the caller's handlers are back
    resumed = train(cfg_for(tiny_model_dir, run, resume_from_checkpoint="latest", **settings),
                    rewards=[StopAt(None)]).output_dir
    full = train(cfg_for(tiny_model_dir, tmp_path / "full", **settings), rewards=[StopAt(None)]).output_dir
    assert_same_tensors(load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors"))
    assert metrics_of(full) == metrics_of(resumed)
    assert completions_of(full) == completions_of(resumed)  # none lost or repeated across the stop


def completions_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tiny_model_dir, tmp_path):
    def twice(prompts, completions, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return [1.0] * len(completions)

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_model_dir, tmp_path / "run", save_steps=0, reward_weights=None), rewards=[twice])
    assert committed_checkpoints(tmp_path / "run") == []


def test_resuming_from_an_older_checkpoint_drops_the_newer_ones(tiny_model_dir, tmp_path):
    full = train(cfg_for(tiny_model_dir, tmp_path / "full", save_steps=1, save_total_limit=None)).output_dir
    older = tmp_path / "branch"
    train(cfg_for(tiny_model_dir, older, save_steps=1, save_total_limit=None))
    # Another temperature from step 3 on: the branch's new steps 3 and 4 differ from the old ones.
    resumed = train(cfg_for(tiny_model_dir, None, save_steps=1, save_total_limit=2, temperature=0.5,
                            resume_from_checkpoint=str(older / "checkpoints" / "step-000002"))).output_dir
    assert resumed == older
    assert [p.name for p in committed_checkpoints(older)] == ["step-000003", "step-000004"]
    final = load_file(older / "model.safetensors")  # save_pretrained names the output layer embed_out
    step_4 = load_file(older / "checkpoints" / "step-000004" / "model.safetensors")  # the module: lm_head
    assert torch.equal(step_4.pop("lm_head.weight"), final.pop("embed_out.weight"))
    assert_same_tensors(step_4, final)
    assert not torch.equal(final["gpt_neox.final_layer_norm.weight"],
                           load_file(full / "model.safetensors")["gpt_neox.final_layer_norm.weight"])


def test_cli_exit_code_after_sigterm(tiny_model_dir, tmp_path):
    reward = tmp_path / "signal_reward.py"
    reward.write_text(textwrap.dedent("""
        import os, signal
        FIRED = __file__ + ".fired"  # once per test, not once per process: the resumed run must not stop
        def fn(prompts, completions, **kwargs):
            if not os.path.exists(FIRED):
                open(FIRED, "w").close()
                os.kill(os.getpid(), signal.SIGTERM)
            return [float(len(c)) for c in completions]
    """))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "rloo", "train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", "rloo:tldr",
                           "--reward_funcs", f"{reward}:fn", "--max_steps", "3", "--num_eval_samples", "0",
                           "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length",
                           "4", "--max_prompt_length", "32", "--output_dir", str(out), "--disable_tqdm"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == TrainingInterrupted.exit_code, done.stderr[-2000:]
    assert "SIGTERM received: stopped after step 1" in done.stderr and "--resume_from_checkpoint latest" in done.stderr
    assert committed_checkpoints(out)[-1].name == "step-000001"
    again = subprocess.run([sys.executable, "-m", "rloo", "train", "--resume_from_checkpoint", "latest", "--output_dir",
                            str(out), "--disable_tqdm"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    from rloo import checkpoint, train
    from test_train_e2e import tiny_config

    model_dir, out, point = sys.argv[1], sys.argv[2], sys.argv[3]
    def die(): os.kill(os.getpid(), signal.SIGKILL)

    def at_nth(module, name, n, before=True):
        real, count = getattr(module, name), [0]
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == n and before: die()
            result = real(*args, **kwargs)
            if count[0] == n and not before: die()
            return result
        setattr(module, name, wrapper)

    # _write_json calls: 1 reference COMMITTED, then per save state.json and COMMITTED (2-3, 4-5, ...);
    # save_file calls: per save optimizer and RNG (1-2, 3-4, ...).
    if point == "mid-step":            # in step 4's update, after the step-2 checkpoint
        import rloo.trainer as trainer
        at_nth(trainer, "policy_update", 4)
    elif point == "mid-save":          # the step-4 save: weights and optimizer written, RNG not yet
        at_nth(checkpoint, "save_file", 4)
    elif point == "before-marker":     # every file of the step-4 save written, COMMITTED not
        at_nth(checkpoint, "_write_json", 5)
    elif point == "before-rename":     # COMMITTED written in the temporary folder, not renamed into place
        at_nth(checkpoint, "_write_json", 5, before=False)
    elif point == "mid-rotation":      # the 3rd save committed, the oldest checkpoint half deleted
        real_rmtree = checkpoint.shutil.rmtree
        def rmtree(path, *args, **kwargs):  # the first removal of a step folder (shutil is everyone's)
            if os.path.basename(path).startswith("step-"): die()
            return real_rmtree(path, *args, **kwargs)
        checkpoint.shutil.rmtree = rmtree
    cfg = tiny_config(model_dir, out, num_eval_samples=0, max_steps=6, learning_rate=1e-3, save_steps=2,
                      save_total_limit=2, temperature=0.9, resume_from_checkpoint=sys.argv[4] if len(sys.argv) > 4 else None)
    train(cfg)
""")


def test_sigkill_anywhere_leaves_a_loadable_checkpoint_that_resumes_exactly(tiny_model_dir, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")  # six processes at once on a 2-core machine: one thread each

    def run(*jobs: tuple[Path, str, tuple[str, ...]]) -> list[int]:
        """The driver once per job, all at the same time (each kills itself at a point in its own code, so
        running them together changes no outcome, only the wall time)."""
        started = [subprocess.Popen([sys.executable, str(driver), str(tiny_model_dir), str(out), point, *resume],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for out, point, resume in jobs]
        codes = []
        for process in started:
            _, stderr = process.communicate(timeout=600)
            if process.returncode not in (0, -signal.SIGKILL):
                print(stderr[-3000:])
            codes.append(process.returncode)
        return codes

    points = ("mid-step", "mid-save", "before-marker", "before-rename", "mid-rotation")
    full = tmp_path / "full"
    codes = run((full, "none", ()), *[(tmp_path / point, point, ()) for point in points])
    assert codes == [0] + [-signal.SIGKILL] * len(points), codes
    for point in points:
        checkpoint.read_checkpoint(committed_checkpoints(tmp_path / point)[-1])  # loadable
    assert run(*[(tmp_path / point, "none", ("latest",)) for point in points]) == [0] * len(points)
    for point in points:
        out = tmp_path / point
        assert_same_tensors(load_file(full / "model.safetensors"), load_file(out / "model.safetensors"))
        assert completions_of(full) == completions_of(out), point


# ------------------------------------------------------------------------------ reward faults
def test_a_raising_reward_function_stops_with_its_name_and_a_checkpoint(tiny_model_dir, tmp_path):
    calls = []

    def flaky(prompts, completions, **kwargs):
        calls.append(1)
        if len(calls) >= 3:
            raise ZeroDivisionError("division by zero")
        return [1.0] * len(completions)

    run = tmp_path / "run"
    with pytest.raises(RewardFunctionError) as info:
        train(cfg_for(tiny_model_dir, run, save_steps=0, reward_weights=None), rewards=[flaky])
    message = str(info.value)
    assert message.startswith("step 3: reward function 'flaky' raised ZeroDivisionError") and "sample 0" in message
    assert "step-000002" in message and "\n" not in message
    assert committed_checkpoints(run)[-1].name == "step-000002"  # the state before the failing step

    def steady(prompts, completions, **kwargs):  # what flaky returned before it broke
        return [1.0] * len(completions)

    steady.__name__ = "flaky"
    resumed = train(cfg_for(tiny_model_dir, run, save_steps=0, reward_weights=None, resume_from_checkpoint="latest"),
                    rewards=[steady]).output_dir
    full = train(cfg_for(tiny_model_dir, tmp_path / "full", save_steps=0, reward_weights=None), rewards=[steady])
    assert_same_tensors(load_file(full.output_dir / "model.safetensors"), load_file(resumed / "model.safetensors"))
    assert metrics_of(full.output_dir) == metrics_of(resumed)


def test_isolated_reward_errors_and_non_finite_rewards_are_counted_never_a_non_finite_loss(tiny_model_dir, tmp_path):
    def awkward(prompts, completions, **kwargs):
        if any(len(c) % 3 == 1 for c in completions):
            raise ValueError("cannot score one of these")
        return [math.inf if i % 4 == 0 else math.nan if i % 4 == 1 else None if i % 4 == 2 else 1.0
                for i in range(len(completions))]

    result = train(cfg_for(tiny_model_dir, tmp_path / "run", save_steps=0, reward_weights=None,
                           reward_errors="isolate"), rewards=[awkward, "grounding"])
    assert result.metrics[-1]["num_reward_errors"] > 0
    assert all(m["num_nonfinite_rewards"] > 0 for m in result.metrics)  # awkward's inf / NaN / None / errors
    assert sum(m["num_unscorable"] for m in result.metrics) == 0  # grounding scores every sample
    for m in result.metrics:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    text = (result.output_dir / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_all_rewards_none_or_equal_give_zero_advantages_and_no_nan(tiny_model_dir, tmp_path):
    for name, fn in (("none", lambda prompts, completions, **kw: [None] * len(completions)),
                     ("equal", lambda prompts, completions, **kw: [0.5] * len(completions))):
        result = train(cfg_for(tiny_model_dir, tmp_path / name, save_steps=0, reward_weights=None, beta=0.0,
                               max_completion_length=3), rewards=[fn])
        for m in result.metrics:
            assert m["advantage_abs_mean"] == 0.0 and m["loss"] == 0.0
            assert (m["reward"] is None) == (name == "none")
        assert "NaN" not in (result.output_dir / "metrics.jsonl").read_text()


def test_eos_only_and_never_ending_completions_train_without_nan(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = list(range(model.config.vocab_size))  # every token ends a completion
    folder = tmp_path / "eos-only"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    result = train(cfg_for(folder, tmp_path / "run", save_steps=0, max_steps=2))
    for m in result.metrics:  # each completion is its EOS alone: empty text, scored, trained on
        assert m["completion_length"] == 1.0 and m["frac_truncated"] == 0.0 and math.isfinite(m["loss"])
    never = train(cfg_for(tiny_model_dir, tmp_path / "never", save_steps=0, max_steps=2, max_completion_length=2,
                          missing_eos_penalty=1.0))
    for m in never.metrics:  # a random model never says EOS within 2 tokens: all truncated, penalised
        assert m["frac_truncated"] == 1.0 and m["reward"] < 0.0 and math.isfinite(m["loss"])
    assert "NaN" not in (never.output_dir / "metrics.jsonl").read_text()


def test_non_finite_loss_skips_the_step_then_stops_with_the_last_good_weights(tiny_model_dir, tmp_path, monkeypatch):
    from rloo import objective

    real, calls = objective.policy_loss, []

    def nan_from_step_3(*args, **kwargs):
        calls.append(1)
        loss, metrics = real(*args, **kwargs)
        return (loss * math.nan if len(calls) >= 3 else loss), metrics

    monkeypatch.setattr(objective, "policy_loss", nan_from_step_3)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteTrainingError) as info:
        train(cfg_for(tiny_model_dir, run, save_steps=0, max_steps=8, max_nonfinite_steps=2))
    assert str(info.value).startswith("step 4: 2 consecutive steps") and "step-000003" in str(info.value)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["num_nonfinite_steps"] for m in lines] == [0, 0, 1] and lines[2]["loss"] is None
    monkeypatch.undo()
    # the skipped step 3 left the weights of step 2: a clean run of 2 steps has the same ones
    clean = train(cfg_for(tiny_model_dir, tmp_path / "clean", save_steps=2, max_steps=8, save_total_limit=None)).output_dir
    saved = committed_checkpoints(run)[-1]
    assert_same_tensors(load_file(saved / "model.safetensors"),
                        load_file(clean / "checkpoints" / "step-000002" / "model.safetensors"))
    # the schedule stands where step 4 starts (3 steps taken, the skipped one included), not one step further
    assert json.loads((saved / "state.json").read_text())["scheduler"]["last_epoch"] == 3


# --------------------------------------------------------------------------------------- bad inputs
def test_bad_dataset_fails_before_the_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "   "}\n')
    with pytest.raises(ValueError, match=r"row 1 .*\(empty or whitespace\)"):
        train(tiny_config(tmp_path / "no-such-model", tmp_path / "run", dataset_name=str(bad)))
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"no 'prompt' column; columns: \['text'\]"):
        train(tiny_config(tmp_path / "no-such-model", tmp_path / "run", dataset_name=str(no_prompt)))


@pytest.mark.parametrize("field, value, message", [
    ("num_generations", 1, "num_generations must be >= 2"),
    ("beta", -0.1, "beta must be >= 0"),
    ("epsilon", -1.0, "epsilon must be >= 0"),
    ("temperature", 0.0, "temperature must be > 0"),
    ("reward_errors", "ignore", "reward_errors must be 'raise' or 'isolate'"),
    ("save_total_limit", 0, "save_total_limit must be >= 1"),
    ("reward_weights", [1.0], "reward_weights has 1 values but there are 2 reward sources"),
    ("per_device_train_batch_size", 3, r"per_device_train_batch_size \* steps_per_generation = 3 completions per "
                                       r"process and generation is not a multiple of num_generations = 2"),
])
def test_invalid_config_values_are_refused_before_any_model_load(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_config(tmp_path / "no-such-model", tmp_path / "run", **{field: value}))


def test_prompt_plus_completion_beyond_the_context_truncates_the_prompt_and_counts(tiny_tokenizer, tmp_path):
    from rloo.tiny import build_model

    from conftest import TINY_RECIPE

    model = build_model(tiny_tokenizer, {**TINY_RECIPE, "max_position_embeddings": 40}, seed=0)
    folder = tmp_path / "short-context"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    result = train(tiny_config(folder, tmp_path / "run", max_prompt_length=None, num_eval_samples=0, save_steps=0))
    assert result.metrics[-1]["num_truncated_prompts"] > 0  # TL;DR prompts are far longer than 40 - 8 tokens
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        train(tiny_config(folder, tmp_path / "run2", max_completion_length=40, num_eval_samples=0))


# ------------------------------------------------------------------------------------------ security
class Payload:
    def __reduce__(self):
        return (os.makedirs, (os.environ["RLOO_PAYLOAD_DIR"],))


def test_a_pickle_in_a_checkpoint_raises_and_never_runs(tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, run, max_steps=2))
    target = tmp_path / "payload-ran"
    monkeypatch.setenv("RLOO_PAYLOAD_DIR", str(target))
    latest = committed_checkpoints(run)[-1]
    (latest / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="damaged: model.safetensors has .* bytes"):
        train(cfg_for(tiny_model_dir, run, resume_from_checkpoint="latest"))
    marker = json.loads((latest / COMMIT_MARKER).read_text())  # a forger would fix the sizes too
    marker["files"]["model.safetensors"] = (latest / "model.safetensors").stat().st_size
    (latest / COMMIT_MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        train(cfg_for(tiny_model_dir, run, resume_from_checkpoint="latest"))
    torch.save({"x": Payload()}, latest / "optimizer.safetensors")
    marker["files"]["optimizer.safetensors"] = (latest / "optimizer.safetensors").stat().st_size
    (latest / COMMIT_MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="optimizer.safetensors is not a readable safetensors file"):
        checkpoint.read_checkpoint(latest)
    assert not target.exists()


def test_nothing_rloo_writes_is_a_pickle(tiny_model_dir, tmp_path):
    run = train(cfg_for(tiny_model_dir, tmp_path / "run", max_steps=2, num_iterations=2, save_steps=1)).output_dir
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "rollout-rank0.safetensors" for p in files)
    for path in files:  # every file is safetensors, a PNG plot or UTF-8 text: no pickle, no torch.save zip
        if path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".png":
            assert path.parent.name == "plots" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            path.read_text(encoding="utf-8")

"""Issue 12: faults that used to hang, leave by the back door or write a broken model (docs/reliability.md):
a reward function that never returns, exits or raises KeyboardInterrupt; a second Ctrl-C during a hang;
an update that leaves non-finite weights; rewards beyond float32; strict JSON in eval.json."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rloo import train
from rloo.checkpoint import committed_checkpoints
from rloo.errors import NonFiniteTrainingError, RewardFunctionError
from rloo.rewards import build_rewards, score_completions
from test_reliability import cfg_for


def lengths(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


class Breaks:
    """A reward source that works for two calls (two steps), then does ``what`` on the third."""

    def __init__(self, what):
        self.what, self.calls, self.__name__ = what, 0, "breaks"

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        if self.calls == 3:
            self.what()
        return [float(len(c)) for c in completions]


def _hang():
    time.sleep(3600)


def _exit():
    sys.exit(3)


def _interrupt():
    raise KeyboardInterrupt


@pytest.mark.parametrize("what, expected", [
    (_hang, "reward function 'breaks' did not return within reward_timeout = 5 s (a batch of 4 samples)"),
    (_exit, "reward function 'breaks' raised SystemExit(3): a reward function must return its values"),
    (_interrupt, "reward function 'breaks' raised KeyboardInterrupt: a reward function must return its values"),
], ids=["never-returns", "sys-exit", "keyboard-interrupt"])
def test_a_reward_function_that_hangs_or_leaves_stops_the_run_with_a_checkpoint(tiny_model_dir, tmp_path, what,
                                                                                expected):
    run = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, run, save_steps=0, reward_weights=None, reward_timeout=5.0, reward_errors="isolate")
    with pytest.raises(RewardFunctionError) as info:
        train(cfg, rewards=[Breaks(what)])  # isolate does not apply: these are not one sample's failure
    message = str(info.value)
    assert message.startswith(f"step 3: {expected}") and "\n" not in message, message
    assert message.endswith(f"the state before this step is saved in {run}/checkpoints/step-000002")
    assert committed_checkpoints(run)[-1].name == "step-000002"


HANG = textwrap.dedent("""
    import os, time
    CALLS = [0]
    def hang(prompts, completions, **kwargs):
        CALLS[0] += 1
        if CALLS[0] == 2:
            open(os.environ["RLOO_TEST_HANGING"], "w").close()
            time.sleep(3600)
        return [float(len(c)) for c in completions]
""")


def test_a_second_ctrl_c_during_a_hanging_reward_function_is_one_line(tiny_model_dir, tmp_path):
    reward = tmp_path / "hang.py"
    reward.write_text(HANG)
    run, hanging = tmp_path / "run", tmp_path / "hanging"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLOO_TEST_HANGING": str(hanging)}
    process = subprocess.Popen(
        [sys.executable, "-m", "rloo", "train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name",
         "rloo:tldr", "--reward_funcs", f"{reward}:hang", "--max_steps", "3", "--save_steps", "1", "--num_eval_samples",
         "0", "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4",
         "--max_prompt_length", "32", "--output_dir", str(run), "--disable_tqdm"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()

    def wait_for(condition):
        deadline = time.monotonic() + 600
        while not condition():
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)

    try:
        wait_for(hanging.exists)  # in step 2's reward call, which never returns
        process.send_signal(signal.SIGINT)
        wait_for(lambda: any("SIGINT received: finishing this step" in line for line in lines))
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=600) == 130
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=60)
    text = "".join(lines)
    assert "Traceback" not in text
    assert lines[-1].strip() == (f"rloo train: a second Ctrl-C: stopped at once, without a checkpoint of the step in "
                                 f"progress; the newest checkpoint is {run}/checkpoints/step-000001 "
                                 "(--resume_from_checkpoint latest)")


def test_an_update_that_leaves_non_finite_weights_is_undone(tiny_model_dir, tmp_path, caplog):
    # A finite learning rate and weight decay whose product overflows float32 in AdamW's decay step.
    run = tmp_path / "run"
    start = load_file(tiny_model_dir / "model.safetensors")
    cfg = cfg_for(tiny_model_dir, run, save_steps=0, learning_rate=3e38, weight_decay=1.0, max_nonfinite_steps=2,
                  beta=0.0)
    with caplog.at_level(logging.WARNING, logger="rloo.trainer"), pytest.raises(NonFiniteTrainingError) as info:
        train(cfg)
    assert "step 1: non-finite weights after the update (undone); the update was skipped" in caplog.text
    assert str(info.value).startswith("step 2: 2 consecutive steps with a non-finite loss, gradient or updated weights")
    saved = load_file(committed_checkpoints(run)[-1] / "model.safetensors")  # after step 1: its update undone
    assert saved.pop("lm_head.weight").equal(start.pop("embed_out.weight"))
    assert all(saved[name].equal(start[name]) for name in start)
    assert load_file(committed_checkpoints(run)[-1] / "optimizer.safetensors") == {}  # Adam's moments untouched


def test_rewards_beyond_float32_are_unscorable_and_said_so(caplog):
    sources = build_rewards([lambda completions, **kw: [1e39, 2.0]])
    with caplog.at_level(logging.WARNING, logger="rloo.rewards.scoring"):
        rewards = score_completions(sources, ["p", "p"], ["a", "b"], {})
    assert math.isnan(rewards[0, 0].item()) and rewards[1, 0].item() == 2.0
    assert "returned 1e+39 at index 0, beyond float32's range" in caplog.text


def test_eval_json_is_strict_json_when_no_reward_is_finite(tiny_model_dir, tmp_path):
    def nothing(prompts, completions, **kwargs):
        return [None] * len(completions)

    out = train(cfg_for(tiny_model_dir, tmp_path / "run", max_steps=1, num_eval_samples=2, reward_weights=None),
                rewards=[nothing]).output_dir

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    summary = json.loads((out / "eval.json").read_text(), parse_constant=refuse)
    assert summary["reward_before"] is None and summary["reward_after"] is None


# ------------------------------------------------------------------------------ checkpoint integrity
def _recommit(folder: Path) -> None:
    """Re-hash every file into COMMITTED: a file that is consistent on disk but wrong inside."""
    import hashlib

    marker = json.loads((folder / "COMMITTED").read_text())
    for name in marker["files"]:
        data = (folder / name).read_bytes()
        marker["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "COMMITTED").write_text(json.dumps(marker))


def test_checkpoints_prove_their_integrity_and_state_json_its_shape(tiny_model_dir, tmp_path):
    import shutil

    from rloo.errors import CheckpointError

    base = tmp_path / "base"
    train(cfg_for(tiny_model_dir, base, max_steps=2, save_steps=2))
    cases = {}

    def edited_step(folder):  # step 2 -> 9 in place: the same size
        state = folder / "state.json"
        text = state.read_text()
        assert '"step": 2,' in text
        state.write_text(text.replace('"step": 2,', '"step": 9,', 1))

    def flipped_byte(folder):
        tensors = folder / "optimizer.safetensors"
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0x01
        tensors.write_bytes(bytes(data))

    def missing_key(folder):
        state = json.loads((folder / "state.json").read_text())
        del state["ranks"]
        (folder / "state.json").write_text(json.dumps(state))
        _recommit(folder)

    def wrong_type(folder):
        state = json.loads((folder / "state.json").read_text())
        state["step"] = "2"
        (folder / "state.json").write_text(json.dumps(state))
        _recommit(folder)

    expected = {edited_step: "damaged: state.json (its sha256 differs from the one committed)",
                flipped_byte: "damaged: optimizer.safetensors (its sha256 differs from the one committed)",
                missing_key: "state.json: 'ranks' is missing",
                wrong_type: "state.json: 'step' is str, expected int"}
    for damage, message in expected.items():
        run = tmp_path / damage.__name__
        shutil.copytree(base, run)
        damage(run / "checkpoints" / "step-000002")
        with pytest.raises(CheckpointError) as info:
            train(cfg_for(tiny_model_dir, run, max_steps=3, resume_from_checkpoint="latest"))
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
        cases[damage.__name__] = str(info.value)
    assert len(cases) == 4


@pytest.mark.parametrize("fused", [False, True])
def test_the_update_guard_puts_back_weights_and_adam_moments_exactly(fused):
    """Fused AdamW writes inf; the foreach one refuses a step size beyond float32 midway (RuntimeError),
    which the trainer undoes the same way (update.py)."""
    from rloo.guard import UpdateGuard

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    guard = UpdateGuard(model, optimizer, undoable=True)

    def step():
        model(torch.randn(2, 4)).square().sum().backward()
        guard.take()
        guard.ready()
        try:
            optimizer.step()
            finite = guard.finite()
        except RuntimeError as err:
            assert not fused and "overflow" in str(err)
            finite = False
        optimizer.zero_grad()
        if not finite:
            guard.undo()
        guard.release()
        return finite

    assert step() and step()  # Adam's moments exist now
    for attempt in range(2):  # twice: the kept buffers are never the optimizer's own tensors after an undo
        before = ([p.detach().clone() for p in model.parameters()],
                  {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()})
        optimizer.param_groups[0]["lr"] = 3e38
        optimizer.param_groups[0]["weight_decay"] = 1.0
        assert not step()
        assert all(p.equal(q) for p, q in zip(model.parameters(), before[0]))
        after = optimizer.state_dict()["state"]
        assert all(after[i][k].equal(v) for i, s in before[1].items() for k, v in s.items())
        optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"] = 1e-2, 0.0
        assert step()  # training goes on from the restored state


def test_without_the_copy_non_finite_weights_stop_the_run_unsaved(tiny_model_dir, tmp_path):
    from rloo.errors import NonFiniteWeightsError

    run = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, run, save_steps=1, learning_rate=3e38, weight_decay=1.0, beta=0.0,
                  undo_nonfinite_updates=False)
    with pytest.raises(NonFiniteWeightsError) as info:
        train(cfg)
    assert str(info.value).startswith("step 1: the update left non-finite weights, which cannot be undone here")
    assert str(info.value).endswith("nothing saved, no checkpoint was written")
    assert committed_checkpoints(run) == []  # the broken weights were never written


def test_outside_training_a_keyboard_interrupt_is_the_users():
    def interrupted(completions, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C does in `rloo eval` or a notebook cell

    with pytest.raises(KeyboardInterrupt):
        score_completions(build_rewards([interrupted]), ["p"], ["a"], {})


def test_state_json_is_strict_json_and_keeps_non_finite_values(tiny_model_dir, tmp_path):
    def nothing(prompts, completions, **kwargs):
        return [None] * len(completions)

    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, run, max_steps=1, save_steps=1, num_eval_samples=2, reward_weights=None),
          rewards=[nothing])

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    state = json.loads((committed_checkpoints(run)[-1] / "state.json").read_text(), parse_constant=refuse)
    assert state["eval_before"]["reward_mean"] == {"$float": "nan"}
    from rloo.checkpoint import read_checkpoint

    meta, _ = read_checkpoint(committed_checkpoints(run)[-1])
    assert math.isnan(meta["eval_before"]["reward_mean"])

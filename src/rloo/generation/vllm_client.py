"""The trainer's side of ``rloo vllm-serve``: JSON to /generate, safetensors bytes to /update_weights (httpx).

Every way the exchange can fail (refused connection, timeout, a reset or half-read answer, a body that
is not the JSON asked for, a 4xx / 5xx answer) raises ``GenerationServerError`` with one line naming
the server and what to do; the trainer then saves the state before the step and stops.

The server names itself with a random instance id; an answer from another instance (the server
restarted and holds its start weights, not the policy's) is an error, as is a generation served with
weights other than those this run pushed (another run pushed its own: one server serves one run).

Several training processes (DDP): only process 0 pushes the weights, which are the same on every
process after an optimizer step; the others wait for it in a broadcast that carries the version the
server gave the push, or process 0's error, so that every process raises the same error at the same
point and each generation names the version it expects. One upload and one engine reload per
change, instead of one per process.
"""

from __future__ import annotations

import http.client
import os
import time
from dataclasses import asdict

import httpx
import torch

from rloo.errors import GenerationServerError, one_line
from rloo.generation.vllm_limits import API_KEY_ENV, check_api_key, state_dict_bytes

CONNECT_TIMEOUT = 10.0  # seconds to open a connection; answers may take long (request_timeout)
TRANSPORT_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, http.client.HTTPException, OSError)


def server_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def http_client(api_key: str | None, read_timeout: float) -> httpx.Client:
    """Keep-alive connections; the key as ``Authorization: Bearer``; no proxy from the environment
    (the server is reached directly, as `rloo vllm-serve` printed it)."""
    key = check_api_key(api_key if api_key is not None else os.environ.get(API_KEY_ENV), API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(headers=headers, timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT), trust_env=False)


class VLLMClient:
    """A connection to one ``rloo vllm-serve`` instance: ``sample``, ``push_weights``, ``close``.

    ``timeout``: seconds to wait for the server at start (``vllm_server_timeout``); ``request_timeout``:
    seconds an answer may take (a generation batch, a weight push). ``api_key``: default RLOO_VLLM_API_KEY."""

    def __init__(self, host: str, port: int, timeout: float = 240.0, request_timeout: float = 3600.0,
                 api_key: str | None = None):
        self.url = server_url(host, port)
        self.http = http_client(api_key, request_timeout)
        try:
            health = wait_for_server(self.url, timeout, http=self.http)
        except BaseException:
            self.http.close()
            raise
        self.instance, self.weights_version = health["instance"], None
        limit, size, dtype = (health.get(key) for key in ("max_prompts", "max_weights_bytes", "dtype"))
        self.max_prompts = limit if isinstance(limit, int) and limit > 0 else 1 << 30
        self.max_weights_bytes = size if isinstance(size, int) else None
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        self.dtype = dtype if isinstance(dtype, torch.dtype) else None  # what the server holds the weights in

    def sample(self, prompt_ids, num_generations, seeds, sampling) -> tuple[list[list[int]], list[list[float]]]:
        """k completions per prompt (token ids, log-probs); batches over the server's per-request limit
        go as several requests (seeds are per prompt: the samples are the same)."""
        tokens, logprobs = [], []
        for start in range(0, len(prompt_ids), self.max_prompts):
            part = slice(start, start + self.max_prompts)
            answer = self._post("/generate", json={
                "prompt_ids": prompt_ids[part], "num_generations": num_generations,
                "seeds": None if seeds is None else seeds[part], "sampling": asdict(sampling),
                "weights_version": self.weights_version})
            rows = len(prompt_ids[part]) * num_generations
            found_tokens, found_logprobs = answer.get("completion_ids"), answer.get("logprobs")
            if not (_rows_of(found_tokens, int, rows) and _rows_of(found_logprobs, (int, float), rows)
                    and all(len(a) == len(b) for a, b in zip(found_tokens, found_logprobs))):
                raise GenerationServerError(f"vLLM server {self.url}/generate answered a malformed body (not {rows} "
                                            "completions with their log-probs); is it `rloo vllm-serve` of this "
                                            "rloo version?")
            tokens += found_tokens
            logprobs += found_logprobs
        return tokens, logprobs

    def push_weights(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        """The policy's weights to the server, in the dtype the server holds (``dtype``, the run's
        compute dtype, is what a colocated engine would hold; the server was started with its own).
        Under torch.distributed: process 0 pushes, every process learns the version (module docstring);
        every process of the group calls this at the same point (the trainer does: sync_generator)."""
        group = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if not group:
            self.weights_version = self._push(model, dtype)
            return
        outcome: list = [None]
        failure = None
        if torch.distributed.get_rank() == 0:
            try:
                outcome = [("pushed", self._push(model, dtype))]
            except Exception as err:  # whatever it is, the other processes must not wait for it forever
                failure, outcome = err, [("failed", str(err))]
        torch.distributed.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if failure is not None:
            raise failure
        if kind == "failed":
            raise GenerationServerError(f"process 0 failed to push the weights: {value}")
        self.weights_version = value

    def _push(self, model: torch.nn.Module, dtype: torch.dtype | None) -> int:
        blob = state_dict_bytes(model, self.dtype or dtype)
        if self.max_weights_bytes is not None and len(blob) > self.max_weights_bytes:
            raise GenerationServerError(f"vLLM server {self.url}: the policy's weights ({len(blob)} bytes) are larger "
                                        f"than the served model's ({self.max_weights_bytes}); start `rloo vllm-serve "
                                        "--model` with the policy being trained")
        answer = self._post("/update_weights", content=blob, headers={"Content-Type": "application/octet-stream"})
        version = answer.get("weights_version")
        if not isinstance(version, int):
            raise GenerationServerError(f"vLLM server {self.url}/update_weights answered without a weights_version; "
                                        "is it `rloo vllm-serve` of this rloo version?")
        return version

    def close(self) -> None:
        """The server is the user's process: it keeps running; only the connections close."""
        self.http.close()

    def _post(self, route: str, **request) -> dict:
        try:
            response = self.http.post(self.url + route, **request)
            answer = response.json()
        except TRANSPORT_ERRORS as err:
            raise GenerationServerError(f"vLLM server {self.url} unreachable during {route} ({one_line(err, with_type=True)}); "
                                        "restart `rloo vllm-serve` and resume from the checkpoint") from None
        except ValueError:  # the body is not JSON (UnicodeDecodeError included)
            raise GenerationServerError(f"vLLM server {self.url}{route} answered {response.status_code} with a body "
                                        "that is not JSON; is vllm_server_host:vllm_server_port `rloo vllm-serve`?") from None
        if not isinstance(answer, dict):
            raise GenerationServerError(f"vLLM server {self.url}{route} answered {response.status_code} with JSON that "
                                        "is not an object; is it `rloo vllm-serve`?")
        # First: a restarted server also refuses this run's weights version (409), for that reason.
        if answer.get("instance") != self.instance and (response.status_code == 200 or "instance" in answer):
            raise GenerationServerError(f"vLLM server {self.url} restarted during the run: it holds its start "
                                        "weights, not the policy's; resume from the checkpoint")
        if response.status_code != 200:
            reason = " ".join(str(answer.get("error") or answer.get("detail") or "no reason given").split())[:300]
            raise GenerationServerError(f"vLLM server {self.url}{route} answered {response.status_code}: {reason}")
        return answer


def _rows_of(rows, kind, count: int) -> bool:
    return isinstance(rows, list) and len(rows) == count and all(
        isinstance(row, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in row) for row in rows)


def wait_for_server(url: str, timeout: float, api_key: str | None = None, http: httpx.Client | None = None) -> dict:
    """GET /health until it answers (the engine may still be loading), or a one-line error; a refused
    key is an error at once."""
    own = http is None
    http = http or http_client(api_key, 30.0)
    deadline, last_error = time.monotonic() + timeout, None
    try:
        while True:
            try:
                response = http.get(url + "/health", timeout=httpx.Timeout(5.0, connect=min(5.0, CONNECT_TIMEOUT)))
                if response.status_code == 401:
                    raise GenerationServerError(f"vLLM server {url} refused the API key: set {API_KEY_ENV} to the key "
                                                "`rloo vllm-serve` was started with (--api_key or its environment)")
                health = response.json()
                if response.status_code == 200 and isinstance(health, dict) and "instance" in health:
                    return health
                last_error = f"answered {response.status_code}, not as `rloo vllm-serve` does"
            except (*TRANSPORT_ERRORS, ValueError) as err:
                last_error = one_line(err, with_type=True)
            if time.monotonic() > deadline:
                raise GenerationServerError(f"vLLM server {url} unreachable for {timeout:.0f} s ({last_error}); start "
                                            "it with `rloo vllm-serve --model MODEL --host HOST --port PORT` "
                                            "(vllm_server_host, vllm_server_port)")
            time.sleep(0.5)
    finally:
        if own:
            http.close()

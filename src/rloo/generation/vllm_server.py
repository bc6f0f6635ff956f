"""``rloo vllm-serve``: vLLM engines behind FastAPI + uvicorn, for trainers with ``--vllm_mode server``.

Routes: GET /health -> {instance, weights_version, model, dtype and the request limits}; POST /generate
(JSON: prompt_ids, num_generations, seeds, sampling, weights_version) -> {completion_ids, logprobs};
POST /update_weights (safetensors bytes) -> {weights_version}. Every answer names the instance (a
random id per start) and the weights version (the number of pushes loaded).

Concurrency: the event loop only reads, checks and answers; engine calls run on one thread per engine
(``EngineThread``: a ``vllm.LLM`` is not thread-safe, so its calls run one at a time, in arrival order),
so requests of several trainers are all answered, each request's prompts split over the engines
(``--data_parallel_size``). Weights change under a readers-writer gate (``WeightGate``): generations
are readers; a push waits for those in flight, holds new ones back until every engine has loaded it,
and so each generation runs on one weight version throughout, the one its answer names.

A push is atomic: its body is read whole (at most the served model's size), checked whole against
the served model's names, shapes and dtypes (vllm_limits.WeightLayout), and only then loaded; a push
refused leaves the old weights serving. If an engine fails while loading (its weights then unknown),
the server answers 503 to everything after, naming the failure: restart it.

Access: on a loopback address the server is open unless a key is set; on any other it refuses to
start without one (--api_key or RLOO_VLLM_API_KEY). Refused requests (no key or a wrong one, a body
over its cap, bad JSON, bad values, weights of another model) get a 4xx JSON answer and one log line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from rloo.errors import RlooError, one_line
from rloo.generation.vllm import Sampling, VLLMEngine, require_vllm, saved_dtype
from rloo.generation.vllm_client import server_url
from rloo.generation.vllm_limits import (API_KEY_ENV, GenerationLimits, Refused, WeightLayout, authorized,
                                         check_api_key, is_loopback, sampling_field_names)

logger = logging.getLogger("rloo.vllm_serve")
SAMPLING_FIELDS = sampling_field_names(Sampling)


class EngineThread:
    """One engine and the one thread that calls it (a daemon: a call still running at exit does not
    hold the process). ``await call(fn, *args)`` from the event loop."""

    def __init__(self, engine: VLLMEngine):
        self.engine, self.jobs = engine, queue.SimpleQueue()
        threading.Thread(target=self._work, name="rloo-engine", daemon=True).start()

    def _work(self) -> None:
        while True:
            fn, args, future = self.jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # handed to the awaiting request
                    future.set_exception(err)

    async def call(self, fn, *args):
        future = concurrent.futures.Future()
        self.jobs.put((fn, args, future))
        return await asyncio.wrap_future(future)


class WeightGate:
    """Readers-writer discipline over the served weights, writers first: ``reading()`` (a generation)
    waits while a push is loading or waiting; ``writing()`` (a push) waits until no generation runs."""

    def __init__(self):
        self._changed = asyncio.Condition()
        self.readers, self.writing_now, self.writers_waiting = 0, False, 0

    @asynccontextmanager
    async def reading(self):
        async with self._changed:
            await self._changed.wait_for(lambda: not self.writing_now and not self.writers_waiting)
            self.readers += 1
        try:
            yield
        finally:
            async with self._changed:
                self.readers -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def writing(self):
        async with self._changed:
            self.writers_waiting += 1
            try:
                await self._changed.wait_for(lambda: not self.writing_now and self.readers == 0)
            finally:
                self.writers_waiting -= 1
            self.writing_now = True
        try:
            yield
        finally:
            async with self._changed:
                self.writing_now = False
                self._changed.notify_all()


@dataclass
class ServerState:
    model: str
    engines: list[EngineThread]
    layout: WeightLayout
    limits: GenerationLimits
    api_key: str | None
    dtype: str
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)
    weights_version: int = 0
    broken: str | None = None  # why the engines' weights are unknown (a load failed inside one)
    gate: WeightGate = field(default_factory=WeightGate)

    def identity(self) -> dict:
        return {"instance": self.instance, "weights_version": self.weights_version}

    def health(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "max_model_len": self.limits.max_model_len,
                "vocab_size": self.limits.vocab_size, "max_prompts": self.limits.max_prompts,
                "max_generations": self.limits.max_generations, "max_weights_bytes": self.layout.max_bytes,
                "broken": self.broken}

    def check_usable(self) -> None:
        if self.broken:
            raise Refused(503, f"{self.broken}; restart `rloo vllm-serve` and resume the run from its checkpoint")


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, refused (413) beyond ``limit`` bytes: at once by its Content-Length, else once
    the bytes read pass it (nothing more is read)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Refused(413, f"{what}: {declared} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"{what}: over {limit} bytes; this server takes at most {limit}")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Refused(400, f"{what}: the client disconnected before the end of the body") from None
    return b"".join(chunks)


async def drain(request: Request, limit: int) -> None:
    """Read and drop the body of a request refused before reading it (a wrong key), up to ``limit``
    bytes: closing the connection with the body unread would reset it, and the client could lose the
    answer (a 401 that says why) to the reset."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit() or int(declared) > limit:
        return
    try:
        async for _ in request.stream():
            pass
    except ClientDisconnect:
        pass


async def generate(state: ServerState, request: Request) -> dict:
    body = await read_body(request, state.limits.max_body_bytes, "generate")
    job = await run_in_threadpool(state.limits.parse, body, SAMPLING_FIELDS)  # a big body: off the event loop
    sampling = Sampling(**job.sampling)
    async with state.gate.reading():
        state.check_usable()
        if job.weights_version is not None and job.weights_version != state.weights_version:
            raise Refused(409, f"generate: the server holds weights version {state.weights_version}, not version "
                          f"{job.weights_version} that this client pushed: another client pushed its weights "
                          "since; one server serves one run")
        share = -(-len(job.prompt_ids) // len(state.engines))
        calls = [worker.call(worker.engine.sample, job.prompt_ids[i * share:(i + 1) * share], job.num_generations,
                             None if job.seeds is None else job.seeds[i * share:(i + 1) * share], sampling)
                 for i, worker in enumerate(state.engines) if i * share < len(job.prompt_ids)]
        parts = await asyncio.gather(*calls, return_exceptions=True)  # every engine done before the gate opens
    for part in parts:
        if isinstance(part, BaseException):
            raise part
    return {"completion_ids": [row for tokens, _ in parts for row in tokens],
            "logprobs": [row for _, values in parts for row in values]}


async def update_weights(state: ServerState, request: Request) -> dict:
    body = await read_body(request, state.layout.max_bytes, "weights")
    num_tensors = await run_in_threadpool(state.layout.check, body)  # whole, before any engine sees it
    start = time.perf_counter()
    async with state.gate.writing():
        state.check_usable()
        done = await asyncio.gather(*(worker.call(worker.engine.load_weights, body) for worker in state.engines),
                                    return_exceptions=True)
        failed = [part for part in done if isinstance(part, BaseException)]
        if failed:
            state.broken = f"a weight push failed inside an engine ({one_line(failed[0], with_type=True)})"
            raise failed[0]
        state.weights_version += 1
    logger.info("weights version %d loaded: %d tensors, %.1f MB, %.2f s", state.weights_version, num_tensors,
                len(body) / 2**20, time.perf_counter() - start)
    return {}


def build_app(state: ServerState) -> FastAPI:
    """The three routes, each answering JSON; refusals and failures are one log line, never a traceback."""
    app = FastAPI(title="rloo vllm-serve", docs_url=None, redoc_url=None, openapi_url=None)

    def route(handler, limit: int):
        async def endpoint(request: Request) -> Response:
            where = f"{request.method} {request.url.path} from {request.client.host if request.client else '?'}"
            try:
                if not authorized(request.headers.get("authorization"), state.api_key):
                    raise Refused(401, f"missing or wrong API key: send `Authorization: Bearer KEY` (rloo train "
                                  f"sends {API_KEY_ENV})")
                answer = {**await handler(state, request), **state.identity()}
                body = await run_in_threadpool(json.dumps, answer)  # P * k rows of tokens: off the event loop
                return Response(body, media_type="application/json")
            except Refused as err:
                logger.warning("refused %s: %d %s", where, err.status, err.message)
                if err.status == 401:
                    await drain(request, limit)
                identity = state.identity() if err.status != 401 else {}
                return JSONResponse({"error": err.message, **identity}, status_code=err.status)
            except Exception as err:  # the engine failed: the client gets the reason, the server stays up
                logger.error("failed %s: %s", where, one_line(err, with_type=True))
                return JSONResponse({"error": one_line(err, with_type=True), **state.identity()}, status_code=500)
        return endpoint

    async def health(state: ServerState, request: Request) -> dict:
        return state.health()

    app.add_api_route("/health", route(health, 0), methods=["GET"])
    app.add_api_route("/generate", route(generate, state.limits.max_body_bytes), methods=["POST"])
    app.add_api_route("/update_weights", route(update_weights, state.layout.max_bytes), methods=["POST"])

    async def no_route(request: Request, err: HTTPException) -> JSONResponse:  # 404 / 405: one line too
        logger.warning("refused %s %s: %d %s", request.method, request.url.path, err.status_code, err.detail)
        return JSONResponse({"error": f"{err.detail}: {request.method} {request.url.path}"}, status_code=err.status_code)

    app.add_exception_handler(HTTPException, no_route)
    return app


def local_model_folder(model: str) -> Path:
    """The served model's folder: a local one, or the hub's snapshot of an id (safetensors and the
    tokenizer; vLLM then loads the same files). One line where neither."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model}: no config.json in this folder; give a model folder "
                             "(save_pretrained) or a hub id")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"--model {model}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, ignore_patterns=["*.bin", "*.pt", "*.pth", "*.msgpack", "*.h5",
                                                              "*.onnx", "*.ot", "original/*"]))
    except Exception as err:
        raise ValueError(f"--model {model}: not a local folder, and the hub does not give it "
                         f"({one_line(err, with_type=True)[:200]})") from None


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken before the (slow) engine start so that a busy port fails at once;
    uvicorn listens on it once the engines are ready (until then a connection is refused)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise OSError(f"--host {host}: not an address this machine has ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart on the same port: TIME_WAIT is fine
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another --port "
                      "or stop the process using it") from None
    return sock


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          tensor_parallel_size: int = 1, data_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
          dtype: str = "auto", max_model_len: int | None = None, seed: int = 0) -> None:
    """Run until SIGINT / SIGTERM (requests in flight are answered first, for up to 30 s). Every check
    that needs no engine (key, model folder, port) comes before the engines start."""
    key = check_api_key(api_key if api_key is not None else os.environ.get(API_KEY_ENV), "--api_key")
    if key is None and not is_loopback(host):
        raise ValueError(f"--host {host}: not a loopback address, and no API key: anyone who reaches it could replace "
                         f"the weights; set {API_KEY_ENV} (or --api_key) here and {API_KEY_ENV} for rloo train")
    require_vllm("serve")
    folder = local_model_folder(model)
    # Built with transformers before the engines start (vLLM patches some of its classes when it starts).
    layout = WeightLayout.from_folder(folder, torch.float32, model)
    sock = bind(host, port)
    engines: list[EngineThread] = []
    try:
        dtype = saved_dtype(folder) if dtype == "auto" else dtype
        for _ in range(data_parallel_size):
            try:
                engine = VLLMEngine(folder, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                    gpu_memory_utilization=gpu_memory_utilization,
                                    tensor_parallel_size=tensor_parallel_size)
            except Exception as err:  # a bad --dtype / --max_model_len, or the engine process failed (vLLM's log)
                raise RlooError(f"the vLLM engine did not start ({one_line(err, with_type=True)[:300]}); vLLM's log above says "
                                "more") from None
            engines.append(EngineThread(engine))
        first = engines[0].engine
        state = ServerState(model, engines, layout.served_as(first.dtype),
                            GenerationLimits(first.max_model_len, first.vocab_size), key,
                            str(first.dtype).removeprefix("torch."))
        config = uvicorn.Config(build_app(state), log_config=None, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=30, server_header=False)
        server = uvicorn.Server(config)
        for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal after its shutdown: a no-op then
            signal.signal(sig, lambda signum, frame: None)
        print(f"rloo vllm-serve: {model} on {server_url(host, port)} (instance {state.instance}; "
              f"{'API key required' if key else 'no API key'})", flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
        for worker in engines:
            worker.engine.close()

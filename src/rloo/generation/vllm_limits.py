"""What crosses the wire between the trainer and ``rloo vllm-serve``, and what the server accepts.

- Weights: safetensors bytes of the policy's state dict (``state_dict_bytes``). The server checks a
  pushed blob WHOLE against the model it serves (``WeightLayout``, built once at start from the model
  folder's config on the meta device): a well-formed file, the same names, shapes and dtypes, nothing
  missing, at most the model's own size in bytes; only then does an engine load it.
- Generation: a JSON object (``GenerationLimits.parse``): token ids within the vocabulary, prompt plus
  ``max_tokens`` within the engine's ``max_model_len``, at most ``max_prompts`` prompts (the client splits
  larger batches: /health names the limits), sane sampling values.
- Access: a shared secret sent as ``Authorization: Bearer KEY``, compared in constant time; required
  by the server on any address but loopback.

Everything refused raises ``Refused(status, message)``: a 4xx answer and one log line on the server.
Pure functions over bytes and JSON (no vllm, no server): tests/test_vllm_limits.py runs them anywhere.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

API_KEY_ENV = "RLOO_VLLM_API_KEY"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
# safetensors dtype codes -> bytes per element (the codes torch tensors are written with)
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class Refused(Exception):
    """A request the server turns down: ``status`` (4xx) and a one-line reason for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def state_dict_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> bytes:
    """The model's weights as safetensors bytes (CPU copies, floating tensors in ``dtype`` when given;
    shared tensors written once, under their first name, as ``save_pretrained`` writes them; LoRA adapters
    merged into the base weights, under the base model's names)."""
    from rloo.adapters import has_adapters, merged_state_dict

    seen, tensors = set(), {}
    state_dict = merged_state_dict(model) if has_adapters(model) else model.state_dict()  # LoRA: W + B A
    for name, tensor in state_dict.items():
        if tensor.data_ptr() in seen:  # a tied weight: vLLM ties it again when loading
            continue
        seen.add(tensor.data_ptr())
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    return save_safetensors(tensors)


# ------------------------------------------------------------------------------ weights
def read_header(blob: bytes) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype code, shape)} of safetensors bytes, or Refused(400) where they are not a well-formed
    file: header length, JSON, each entry's dtype / shape / offsets, data exactly covering the rest."""
    if len(blob) < 8:
        raise Refused(400, f"weights: {len(blob)} bytes are not a safetensors file")
    size = int.from_bytes(blob[:8], "little")
    if size > min(len(blob) - 8, MAX_HEADER_BYTES):
        raise Refused(400, f"weights: not a safetensors file (header length {size} for {len(blob)} bytes)")
    try:
        header = json.loads(blob[8 : 8 + size])
    except (ValueError, RecursionError):  # UnicodeDecodeError included; RecursionError: nested too deep
        raise Refused(400, "weights: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise Refused(400, "weights: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    entries, spans = {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = dtype in ITEM_BYTES and all(_is_int(d) and d >= 0 for d in shape) and _is_int(start) and _is_int(end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or end - start != math.prod(shape) * ITEM_BYTES[dtype]:
            raise Refused(400, f"weights: not a safetensors file (entry {name!r} is malformed)")
        entries[name] = (dtype, shape)
        spans.append((start, end))
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise Refused(400, "weights: not a safetensors file (its tensors' data overlap or leave gaps)")
        position = end
    if position != len(blob) - 8 - size:
        raise Refused(400, f"weights: not a safetensors file ({len(blob) - 8 - size - position} bytes of data "
                      "beyond its tensors)")
    return entries


@dataclass
class WeightLayout:
    """The names, dtype codes and shapes a push must carry: what ``state_dict_bytes`` writes for the
    served model (its in-memory names: transformers renames some on saving, e.g. GPTNeoX's lm_head
    to embed_out), floating tensors in the served dtype."""

    expected: dict[str, tuple[str, tuple[int, ...]]]
    model: str = ""

    @classmethod
    def from_folder(cls, folder: str | Path, served_dtype: torch.dtype, model: str = "",
                    trust_remote_code: bool = False) -> WeightLayout:
        """The model of a folder built on the meta device (no memory, no weights read): its state dict's
        names and shapes, tied tensors under their first name only, as ``state_dict_bytes`` does."""
        folder = Path(folder)
        if not any(folder.glob("*.safetensors")):
            raise ValueError(f"--model {model or folder}: no safetensors weights in {folder} (rloo loads and pushes "
                             "safetensors only); save the model with save_pretrained(safe_serialization=True)")
        code = CODES.get(served_dtype)
        if code is None:
            raise ValueError(f"--dtype: weights pushed as {served_dtype} are not supported; use float32, bfloat16 "
                             "or float16")
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        seen, expected = set(), {}
        for name, tensor in meta.state_dict(keep_vars=True).items():  # tied: the same Parameter object
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            expected[name] = (code if tensor.is_floating_point() else _code_of(tensor.dtype), tuple(tensor.shape))
        return cls(expected, model or str(folder))

    def served_as(self, dtype: torch.dtype) -> WeightLayout:
        """The same layout with floating tensors in ``dtype`` (the engine's, known once it started)."""
        code = CODES.get(dtype)
        if code is None:
            raise ValueError(f"--dtype: weights pushed as {dtype} are not supported; use float32, bfloat16 or float16")
        return WeightLayout({name: (code if old in FLOATING else old, shape)
                             for name, (old, shape) in self.expected.items()}, self.model)

    @property
    def max_bytes(self) -> int:
        """The largest push: every tensor's data plus a header (JSON, ~100 bytes a tensor) with slack."""
        data = sum(math.prod(shape) * ITEM_BYTES[code] for code, shape in self.expected.values())
        return data + 8 + 64 * 1024 + 512 * len(self.expected)

    def check(self, blob: bytes) -> int:
        """The number of tensors in ``blob``, or Refused: malformed (400), or not this model's weights (422)."""
        found = read_header(blob)
        unknown = sorted(set(found) - set(self.expected))
        missing = sorted(set(self.expected) - set(found))
        where = f"the server serves {self.model}: start `rloo vllm-serve --model` with the policy being trained"
        if unknown:
            raise Refused(422, f"weights: {len(unknown)} tensor(s) the served model does not have (first: "
                          f"{unknown[0]!r}); {where}")
        if missing:
            raise Refused(422, f"weights: {len(missing)} tensor(s) of the served model missing (first: "
                          f"{missing[0]!r}); push the whole state dict")
        for name, (code, shape) in found.items():
            want_code, want_shape = self.expected[name]
            if shape != want_shape:
                raise Refused(422, f"weights: {name!r} has shape {list(shape)}, the served model's is "
                              f"{list(want_shape)}; {where}")
            if code != want_code:
                raise Refused(422, f"weights: {name!r} is {code}, the served model holds {want_code}; send "
                              "floating tensors in the dtype /health names")
        return len(found)


# ------------------------------------------------------------------------------ generation
@dataclass
class GenerationJob:
    """One /generate request, checked."""

    prompt_ids: list[list[int]]
    num_generations: int
    seeds: list[int] | None
    sampling: dict  # the fields of vllm.Sampling
    weights_version: int | None  # the version the client pushed (None: it pushed none, any version serves it)


@dataclass
class GenerationLimits:
    """What one /generate request may ask of the engine."""

    max_model_len: int
    vocab_size: int
    max_prompts: int = 0  # 0: derived from max_model_len (at most 4096; ~32M prompt tokens a request)
    max_generations: int = 1024  # k per prompt

    def __post_init__(self):
        self.max_prompts = self.max_prompts or max(1, min(4096, (32 << 20) // self.max_model_len))

    @property
    def max_body_bytes(self) -> int:
        """max_prompts prompts of max_model_len tokens as JSON (up to 8 characters a token id, 32 for
        the brackets and a seed) and the sampling values."""
        return self.max_prompts * (self.max_model_len * 8 + 32) + 64 * 1024

    def parse(self, body: bytes, sampling_fields: set[str]) -> GenerationJob:
        """The request in ``body``, or Refused(400) for bad JSON, Refused(422) for a bad field or value."""
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            raise Refused(400, "generate: the body is not JSON") from None
        if not isinstance(request, dict):
            raise Refused(422, "generate: the body must be a JSON object")
        unknown = set(request) - {"prompt_ids", "num_generations", "seeds", "sampling", "weights_version"}
        if unknown:
            raise Refused(422, f"generate: unknown field(s) {sorted(unknown)}")
        prompts = request.get("prompt_ids")
        if not isinstance(prompts, list) or not prompts:
            raise Refused(422, "generate: prompt_ids must be a non-empty list of prompts (token id lists)")
        if len(prompts) > self.max_prompts:
            raise Refused(413, f"generate: {len(prompts)} prompts; the server takes at most {self.max_prompts} a "
                          "request (/health names it)")
        num_generations = _int_field(request, "num_generations", 1, self.max_generations)
        sampling = self._sampling(request.get("sampling"), sampling_fields)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, list) or not prompt or not all(_is_int(t) and 0 <= t < self.vocab_size
                                                                     for t in prompt):
                raise Refused(422, f"generate: prompt_ids[{i}] must be a non-empty list of token ids in "
                              f"0..{self.vocab_size - 1}")
            if len(prompt) + sampling["max_tokens"] > self.max_model_len:
                raise Refused(422, f"generate: prompt_ids[{i}] has {len(prompt)} tokens; with max_tokens "
                              f"{sampling['max_tokens']} that exceeds the server's max_model_len {self.max_model_len}")
        seeds = request.get("seeds")
        if seeds is not None and (not isinstance(seeds, list) or len(seeds) != len(prompts)
                                  or not all(_is_int(s) for s in seeds)):
            raise Refused(422, "generate: seeds must be null or one integer per prompt")
        version = request.get("weights_version")
        if version is not None and not (_is_int(version) and version >= 0):
            raise Refused(422, "generate: weights_version must be null or a non-negative integer")
        return GenerationJob(prompts, num_generations, seeds, sampling, version)

    def _sampling(self, values, names: set[str]) -> dict:
        if not isinstance(values, dict) or not {"max_tokens", "stop_token_ids"} <= set(values) <= names:
            raise Refused(422, f"generate: sampling must be an object with max_tokens, stop_token_ids and optionally "
                          f"{sorted(names - {'max_tokens', 'stop_token_ids'})}")
        _int_field(values, "max_tokens", 1, self.max_model_len - 1, "sampling.")
        stop = values["stop_token_ids"]
        if not isinstance(stop, list) or len(stop) > 64 or not all(_is_int(t) and 0 <= t < self.vocab_size
                                                                   for t in stop):
            raise Refused(422, f"generate: sampling.stop_token_ids must be a list of token ids in 0..{self.vocab_size - 1}")
        for name, low, high, low_open in (("temperature", 0.0, 1e4, False), ("top_p", 0.0, 1.0, True),
                                          ("min_p", 0.0, 1.0, False), ("repetition_penalty", 0.0, 1e4, True)):
            value = values.get(name)
            if value is not None and not (_is_number(value) and (value > low if low_open else value >= low)
                                          and value <= high):
                raise Refused(422, f"generate: sampling.{name} must be a number in {'(' if low_open else '['}"
                              f"{low:g}, {high:g}], got {value!r}")
        if "top_k" in values:
            _int_field(values, "top_k", 0, self.vocab_size, "sampling.")
        if not isinstance(values.get("greedy", False), bool):
            raise Refused(422, "generate: sampling.greedy must be true or false")
        return values


def _int_field(values: dict, name: str, low: int, high: int, prefix: str = "") -> int:
    value = values.get(name)
    if not (_is_int(value) and low <= value <= high):
        raise Refused(422, f"generate: {prefix}{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def _code_of(dtype: torch.dtype) -> str:
    return {torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}.get(dtype) or CODES[dtype]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------ access
def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_api_key(key: str | None, where: str) -> str | None:
    """A usable shared secret (printable ASCII, as an HTTP header carries it), None when not set."""
    if key is None or key == "":
        return None
    if not (key.isascii() and key.isprintable() and key.strip() == key):
        raise ValueError(f"{where}: the API key must be printable ASCII without surrounding spaces")
    return key


def authorized(header: str | None, key: str | None) -> bool:
    """``Authorization: Bearer KEY`` matches the server's key (constant time); anything does without a key.
    ``header`` as the ASGI server decodes it (latin-1: the raw bytes come back by encoding it again)."""
    if key is None:
        return True
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), key.encode("ascii"))


def sampling_field_names(sampling_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(sampling_cls)}

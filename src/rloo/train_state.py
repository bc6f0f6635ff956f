"""What an exact resume needs besides the weights: ``TrainState``, the RNG states, and the split of optimizer
and rollout state into a JSON part (state.json) and a tensor part (safetensors), and back."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Everything besides model, optimizer and scheduler that step ``step + 1`` starts from."""

    step: int = 0  # optimizer steps done
    sampler: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)  # num_truncated_prompts, num_skipped_steps, ...
    rollout: Any = None  # the generation batch the next step reuses (num_iterations > 1), else None
    eval_before: dict | None = None
    rng: tuple[dict, dict[str, torch.Tensor]] | None = None  # (json part, tensor part), see capture_rng
    scheduler: dict | None = None  # the learning-rate schedule's state at ``step`` (None: take the live one)
    scaler: dict | None = None  # fp16 loss scaling (scale, growth tracker), when a scaler runs


# ------------------------------------------------------------------------------------------------ RNG
def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python, numpy, torch CPU and CUDA generator states: a JSON part and a tensor part."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return json_part, tensors


def restore_rng(state: tuple[dict, dict[str, torch.Tensor]]) -> None:
    json_part, tensors = state
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(len(tensors) - 1) if f"torch_cuda_{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------- JSON and tensors
def tagged(value: Any) -> Any:
    """Strict JSON that keeps non-finite floats (an unscorable "before" reward, a NaN in a dataset column):
    each becomes {"$float": "nan" | "inf" | "-inf"}, read back by ``untag``."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    if isinstance(value, dict):
        return {k: tagged(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tagged(v) for v in value]
    return value


def untag(obj: dict) -> Any:
    return float(obj["$float"]) if len(obj) == 1 and "$float" in obj else obj


def optimizer_state(meta_optimizer: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Rebuild ``optimizer.state_dict()`` from its JSON and tensor parts."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in meta_optimizer["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": meta_optimizer["param_groups"]}


def split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"scalars": scalars, "param_groups": jsonable(state_dict["param_groups"])}


def split_rollout(rollout) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {}
    for f in fields(rollout):
        value = getattr(rollout, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value.detach().contiguous().cpu()
        else:
            rest[f.name] = value
    return tensors, jsonable(rest)


def rollout_fields(meta_rollout: dict, tensors: dict[str, torch.Tensor], device) -> dict:
    return {**meta_rollout, **{name: t.to(device) for name, t in tensors.items()}}


def jsonable(value: Any) -> Any:
    """Tuples -> lists, tensors/numpy scalars -> numbers, recursively (what JSON can hold)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value

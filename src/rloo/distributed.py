"""Where the models live across processes: DDP, FSDP2 or DeepSpeed ZeRO, as the accelerate config the
run was launched with says (configs/accelerate/). The trainer asks these functions and never names a
strategy itself.

- ``strategy(accelerator)``: 'single', 'ddp', 'fsdp', 'zero1', 'zero2' or 'zero3'.
- ``prepare_frozen(accelerator, model)``: the reference policy or a reward model laid out like the
  policy: sharded under FSDP and ZeRO-3 (no process holds a full copy), replicated otherwise.
- ``gathered_for_generation(accelerator, model, enabled)``: the sharded policy's full weights gathered
  once for a whole generation batch, instead of layer by layer at every decoded token.
- ``lockstep(accelerator, gather)``: where weights are not gathered, every process decodes until all are done.
- ``full_state_dict(accelerator, model)``: every weight, on process 0, for the run folder.
- ``raise_on_every_process(accelerator, failure, elsewhere)``: one process's failure stops them all.
- ``replicated(accelerator)``: every process holds the whole policy and optimizer state.

The policy itself is sharded by ``accelerator.prepare`` (accelerate's own FSDP2 / DeepSpeed code).
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env

logger = logging.getLogger(__name__)

SHARDED = ("fsdp", "zero3")  # no process holds the whole policy outside a forward


def strategy(accelerator: Accelerator) -> str:
    """The layout accelerate was configured with ('zero1'..'zero3' for DeepSpeed's stages)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def replicated(accelerator: Accelerator) -> bool:
    """Every process holds the whole policy and optimizer state (one process, DDP); FSDP and DeepSpeed (every
    stage) share the optimizer state out, and their checkpoints are written by every process (shards.py)."""
    return strategy(accelerator) in ("single", "ddp")


def setup_strategy(accelerator: Accelerator, cfg) -> None:
    """Refuse, in one line, what rloo does not do under the configured strategy; give DeepSpeed the
    sizes it cannot infer without a DataLoader (where its config leaves them 'auto')."""
    name = strategy(accelerator)
    for asked, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(variable) and name in ("single", "ddp"):  # accelerate fell back to DDP silently
            raise ValueError(f"accelerate config: {asked} runs on GPUs only (accelerate's rule) and this process has "
                             "none; on CPUs use configs/accelerate/cpu-gloo.yaml (DDP)")
    if cfg.use_vllm and name in SHARDED:
        raise ValueError(f"use_vllm: not supported under {name} yet (the engine needs the whole policy's weights "
                         "every step); use ddp.yaml or zero2.yaml")
    if name == "fsdp" and not accelerator.is_fsdp2:
        raise ValueError("accelerate config: FSDP version 1 is not supported; set fsdp_version: 2 "
                         "(configs/accelerate/fsdp.yaml)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        # A micro-batch is per_device_train_batch_size completions; DeepSpeed clips, so it gets rloo's norm.
        for key, value in (("train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size),
                           ("gradient_clipping", cfg.max_grad_norm)):
            if config.get(key, "auto") == "auto":
                config[key] = value


def prepare_frozen(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A model that is never trained (reference policy, reward model), sharded like the policy under
    FSDP / ZeRO-3, else moved whole to this process's device. Call after ``accelerator.prepare``."""
    name = strategy(accelerator)
    if name == "fsdp":
        return shard_frozen(model, accelerator.device)
    if name == "zero3":
        # The policy's DeepSpeed config (its "auto" values filled by accelerator.prepare), minus the optimizer.
        config = {key: value for key, value in accelerator.state.deepspeed_plugin.deepspeed_config.items()
                  if key not in ("optimizer", "scheduler")}
        return partition_frozen(model, config)
    return model.to(accelerator.device)


def partition_frozen(model: torch.nn.Module, deepspeed_config: dict) -> torch.nn.Module:
    """ZeRO-3 partitions of a frozen model under a DeepSpeed engine without optimizer. Its forward hooks
    fetch each module's parameters as that module runs, so the model (returned, not the engine) is
    called like a plain one, a reward model's backbone and head separately included."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config)
    engine.eval()
    return engine.module


def shard_frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 units for a frozen model: each transformer layer (``_no_split_modules``), and each other module
    that owns parameters itself (embeddings, final norm, output layer or score head), every unit freeing
    its gathered weights after its forward. The backbone and the top module stay plain: rloo calls a
    reward model's backbone and head separately (RewardModel), and transformers finds a model's
    hidden-state outputs by its class, which an FSDP unit's class would hide."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    model.to(device)
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    inside = {id(m) for layer in layers for m in layer.modules()}
    owners = [m for m in model.modules() if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
    for unit in layers + owners:
        fully_shard(unit, reshard_after_forward=True)  # explicit: a unit with no FSDP parent would keep them
    return model


@contextmanager
def gathered_for_generation(accelerator: Accelerator | None, model: torch.nn.Module, enabled: bool = True):
    """The sharded policy's full weights on every process while the block runs (one all-gather for the
    whole generation batch), sharded again after it. Off (``ds3_gather_for_generation false``), each
    forward gathers layer by layer: slower, but a model that does not fit one GPU can still generate."""
    name = strategy(accelerator) if accelerator is not None and enabled else "single"
    with gathered(model, name):
        yield


@contextmanager
def gathered(model: torch.nn.Module, name: str):
    """``model``'s full weights while the block runs, under strategy ``name`` (nothing to do unless sharded)."""
    if name == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
    elif name == "fsdp":
        with unsharded(model):
            yield
    else:
        yield


@contextmanager
def unsharded(model: torch.nn.Module):
    """Every FSDP2 unit of ``model`` all-gathered and kept so through its forwards (none reshards after
    them), then resharded and given back its own reshard-after-forward setting."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    settings = [_reshards_after_forward(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, setting in zip(units, settings):
            unit.reshard()
            if setting is not None:
                unit.set_reshard_after_forward(setting, recurse=False)


def _reshards_after_forward(unit) -> bool | None:
    """Whether an FSDP2 unit frees its gathered weights after forward (torch keeps this in the unit's
    parameter group: a post-forward mesh exactly when it reshards); None for a unit without parameters."""
    groups = unit._get_fsdp_state()._fsdp_param_groups
    if not groups:
        return None
    return any(group.post_forward_mesh_info is not None for group in groups)


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict | None:
    """The policy's whole state dict on process 0 (gathered from the shards under FSDP / ZeRO-3; every
    process must call this); None means the model's own ``state_dict()`` (nothing is sharded)."""
    if strategy(accelerator) not in SHARDED:
        return None
    return accelerator.get_state_dict(model)


def lockstep(accelerator: Accelerator | None, gather_for_generation: bool):
    """For generation over a sharded policy whose weights are not gathered, where every forward is a
    collective: ``all_done(done_here) -> bool``, so that all processes decode the same number of tokens.
    None where forwards need no such agreement."""
    if accelerator is None or gather_for_generation or strategy(accelerator) not in SHARDED:
        return None
    return functools.partial(all_processes_done, device=accelerator.device)


def all_processes_done(done_here: bool, device: torch.device) -> bool:
    """True once every process of the group is done (one all-reduce)."""
    flag = torch.tensor([0 if done_here else 1], device=device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0


def raise_on_every_process(accelerator: Accelerator, failure: BaseException | None,
                           elsewhere: Callable[[], BaseException]) -> None:
    """Raise ``failure`` here, or ``elsewhere()`` when another process failed (one all-reduce), so that no
    process is left waiting in a collective its failed peer never reaches."""
    raise_everywhere(failure, elsewhere, accelerator.device)


def raise_everywhere(failure: BaseException | None, elsewhere: Callable[[], BaseException],
                     device: torch.device) -> None:
    """``raise_on_every_process`` for the default process group (none started: this process alone)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        flag = torch.tensor([failure is not None], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and failure is None:
            failure = elsewhere()
    if failure is not None:
        raise failure

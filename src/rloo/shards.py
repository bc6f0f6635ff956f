"""Checkpoints of a policy whose optimizer state (and, under FSDP2 / ZeRO-3, weights) the processes share
out: every process writes its own part into the step folder's staging copy, then the main process writes
the rest (RNG, data position, state.json) and commits it as for any checkpoint (checkpoint.py). A folder
holds only what was committed, so a save killed half-way is as invisible here as elsewhere.

- FSDP2, ``sharded/``: the model and optimizer tensors through torch.distributed.checkpoint, stored as
  safetensors (one file per process; where each piece sits in the whole tensor is in the file's own
  metadata, HuggingFaceStorageWriter); the optimizer's param groups in state.json. No pickle is written
  or read.
- DeepSpeed (ZeRO 1-3), ``deepspeed/``: the engine's own checkpoint (engine.save_checkpoint: the model
  states and each process's ZeRO partition of the optimizer). Those files are torch pickles, DeepSpeed's
  format; rloo checks each against the sha256 COMMITTED recorded before DeepSpeed reads it. Resume only
  from checkpoints you trust.
- The reference (frozen, sharded under FSDP2 / ZeRO-3 too) is gathered into one model.safetensors, as
  in every other layout.

Resume needs the layout and the number of processes the checkpoint was written with (the fingerprint).
The files must be on storage every process sees (one machine, or a shared file system).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from rloo.checkpoint import (
    COMMIT_MARKER,
    load_tensors,
    load_weights,
    reference_saved,
    remove_checkpoint,
    save_checkpoint,
    save_reference,
    stage,
    staging,
    step_folder,
)
from rloo.distributed import raise_everywhere
from rloo.errors import CheckpointError
from rloo.train_state import TrainState, jsonable

SHARDED_DIR, DEEPSPEED_DIR, DEEPSPEED_TAG = "sharded", "deepspeed", "state"


def _main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_sharded(layout: str, output_dir: Path, states: list[TrainState], policy, optimizer, reference,
                 scheduler, config: dict, fingerprint: dict, save_total_limit: int | None, device) -> Path:
    """Every process: write step ``states[0].step`` under ``layout`` ('fsdp', 'zero1'..'zero3'), the
    reference once; every process raises the same CheckpointError when any part fails. ``policy``: the
    FSDP2 module or the DeepSpeed engine; ``optimizer``: the torch optimizer (FSDP2)."""
    final = step_folder(output_dir, states[0].step)
    if _main_says((final / COMMIT_MARKER).is_file(), device):  # committed already (a failure right after a save)
        return final
    elsewhere = lambda: CheckpointError(f"could not write checkpoint {final}: another process failed (its "  # noqa: E731
                                        "message is there)")
    if reference is not None and _main_says(not reference_saved(output_dir), device):  # one answer for all
        tensors, error = full_weights(layout, reference), None
        if _main():
            try:
                save_reference(output_dir, reference, tensors)
            except CheckpointError as err:
                error = err
        raise_everywhere(error, elsewhere, device)
    error = None
    if _main():
        try:
            stage(final)
        except CheckpointError as err:
            error = err
    raise_everywhere(error, elsewhere, device)
    try:
        optimizer_json = write_parts(layout, staging(final), policy, optimizer)
    except (Exception, CheckpointException) as err:  # the latter is a BaseException, raised on every process
        error = CheckpointError(f"could not write checkpoint {final}: the {layout} part of {_reason(err)}")
    try:
        raise_everywhere(error, elsewhere, device)
    except CheckpointError:
        if _main():
            remove_checkpoint(staging(final))
        raise
    if _main():
        try:
            save_checkpoint(output_dir, None, None, scheduler, states, config, fingerprint, save_total_limit,
                            sharded={"layout": layout, "optimizer": optimizer_json})
        except CheckpointError as err:
            error = err
    raise_everywhere(error, elsewhere, device)
    return final


def _main_says(answer: bool, device) -> bool:
    """The main process's ``answer`` on every process (a file another process may be writing now is not
    a question each may answer for itself)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return answer
    flag = torch.tensor([int(answer)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _reason(err: BaseException) -> str:
    """One line: which process failed and why (torch.distributed.checkpoint reports every process's failure)."""
    failures = getattr(err, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items())[0]
        err = failure[0] if isinstance(failure, tuple) else failure
    else:
        rank = dist.get_rank() if dist.is_initialized() else 0
    reason = " ".join(str(getattr(err, "strerror", None) or err).split())[:300]
    return f"process {rank}: {reason} ({type(err).__name__})"


def write_parts(layout: str, folder: Path, policy, optimizer) -> dict:
    """This process's weights and optimizer state under ``folder``; -> the optimizer's JSON part (and, under
    FSDP2, the names of the tensors written)."""
    if layout == "fsdp":
        import torch.distributed.checkpoint as dcp

        # An optimizer without state yet (a save before the first step) stays so: asking torch for its state
        # dict would make it, with one zero-gradient step, and change the run that saves.
        tensors, optimizer_json = _fsdp_tensors(policy, optimizer, with_optimizer=bool(optimizer.state))
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder / SHARDED_DIR), save_distributed=True))
        return {**optimizer_json, "keys": sorted(tensors)}
    failures: list[BaseException] = []
    with _recording_failures(policy, failures):  # DeepSpeed's barriers are reached by every process
        policy.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
    if failures:
        raise failures[0]
    return {"scalars": {}, "param_groups": []}  # DeepSpeed's own files hold it


def read_parts(layout: str, folder: Path, policy, optimizer, optimizer_json: dict) -> None:
    """Every process: load this process's part of the weights and optimizer state from ``folder``; one line,
    the same on every process, when it cannot."""
    failure = None
    try:
        _read_parts(layout, folder, policy, optimizer, optimizer_json)
    except (Exception, CheckpointException) as err:  # the latter is a BaseException, raised on every process
        failure = CheckpointError(f"cannot resume from {folder}: the {layout} part of {_reason(err)}")
    raise_everywhere(failure, lambda: CheckpointError(f"cannot resume from {folder}: another process could not "
                                                      "load its part (its message is there)"), _device(policy))


def _read_parts(layout: str, folder: Path, policy, optimizer, optimizer_json: dict) -> None:
    if layout == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        saved = set(optimizer_json.get("keys", ()))
        with_optimizer = any(key.startswith("optimizer.") for key in saved) or "keys" not in optimizer_json
        tensors, _ = _fsdp_tensors(policy, optimizer, with_optimizer)  # the targets, in this process's layout
        if saved:
            tensors = {key: t for key, t in tensors.items() if key in saved}
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder / SHARDED_DIR)))
        model_state = get_model_state_dict(policy)  # every name: a tied weight's second name is the loaded tensor
        loaded = {name[len("model."):]: t for name, t in tensors.items() if name.startswith("model.")}
        set_model_state_dict(policy, {fqn: loaded.get(fqn, t) for fqn, t in model_state.items()})
        if not with_optimizer:
            return
        state: dict = {}
        for key, value in [*optimizer_json["scalars"].items(),
                           *((k[len("optimizer."):], t) for k, t in tensors.items() if k.startswith("optimizer."))]:
            name, fqn = key.split(".", 1)
            state.setdefault(fqn, {})[name] = value
        # strict False: a parameter that never had a gradient has no state in the checkpoint (nor in the run)
        set_optimizer_state_dict(policy, optimizer, {"state": state, "param_groups": optimizer_json["param_groups"]},
                                 options=StateDictOptions(strict=False))
        return
    path, _ = policy.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"checkpoint {folder}: DeepSpeed found no state under {folder / DEEPSPEED_DIR}")


def _fsdp_tensors(policy, optimizer, with_optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The FSDP2 policy's and optimizer's sharded tensors ("model.<fqn>", "optimizer.<name>.<fqn>"; a tied
    weight once, under its first name) and the optimizer's JSON part (param groups by fully qualified
    name, non-tensor state)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tensors, seen = {}, set()
    for fqn, t in get_model_state_dict(policy).items():
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if local.numel() and key in seen:
            continue  # safetensors holds each tensor once
        seen.add(key)
        tensors[f"model.{fqn}"] = t
    if not with_optimizer:
        return tensors, {"scalars": {}, "param_groups": []}
    optimizer_state = get_optimizer_state_dict(policy, optimizer)  # a fresh optimizer's state is made (lr 0)
    scalars = {}
    for fqn, values in optimizer_state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{name}.{fqn}"] = value
            else:
                scalars[f"{name}.{fqn}"] = value
    return tensors, {"scalars": jsonable(scalars), "param_groups": jsonable(optimizer_state["param_groups"])}


@contextlib.contextmanager
def _recording_failures(engine, failures: list):
    """DeepSpeed's checkpoint writes, each failure kept in ``failures`` instead of raised: a process whose write
    fails goes on to DeepSpeed's barriers with the others, and every process raises together afterwards."""
    writer = engine.checkpoint_engine
    save, own = writer.save, "save" in vars(writer)

    def recording(*args, **kwargs):
        try:
            return save(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - raised on every process after DeepSpeed's save
            failures.append(err)

    writer.save = recording
    try:
        yield
    finally:
        if own:
            writer.save = save
        else:
            del writer.save  # the class's method again


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------ reference
def full_weights(layout: str, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Every process: a frozen model's whole weights on the main process (an empty dict elsewhere) where
    ``layout`` shards it; None where each process holds it whole (then ``save_model`` writes it)."""
    if layout == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name: t.contiguous() for name, t in weights.items()} if _main() else {}
    if layout == "zero3":
        with _gathered_zero3(model):
            return {name: p.detach().cpu().clone() for name, p in model.named_parameters()} if _main() else {}
    return None


def load_reference(layout: str, model: torch.nn.Module, folder: Path) -> None:
    """Every process: ``folder``'s model.safetensors into a frozen model, sharded by ``layout`` or whole:
    where it is sharded, read by the main process and spread from it."""
    if layout not in ("fsdp", "zero3"):
        load_weights(model, folder)
        return
    tensors = load_tensors(folder / "model.safetensors") if _main() else {}
    if layout == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return
    params, failure = dict(model.named_parameters()), None
    with _gathered_zero3(model, modifier_rank=0):
        if _main():
            if tensors.keys() != params.keys():
                failure = CheckpointError(f"checkpoint {folder}: its weights do not fit the model (missing "
                                          f"{sorted(params.keys() - tensors.keys())[:3]})")
            else:
                with torch.no_grad():
                    for name, tensor in tensors.items():
                        params[name].copy_(tensor)
    raise_everywhere(failure, lambda: CheckpointError(f"checkpoint {folder}: process 0 could not load it"),
                     next(model.parameters()).device)


@contextlib.contextmanager
def _gathered_zero3(model: torch.nn.Module, modifier_rank: int | None = None):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank):
        yield

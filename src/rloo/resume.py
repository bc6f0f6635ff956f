"""Checkpoints of a run and exact resume: what the loop's state is now (``snapshot``), writing it on
every process's behalf (``save``), what a resumed run must share with it (``fingerprint``) and loading
it back (``resume``). The files themselves are checkpoint.py's."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import fields, replace
from pathlib import Path

import torch

from rloo.checkpoint import (
    COMMIT_MARKER,
    REFERENCE,
    committed_checkpoints,
    drop_newer_checkpoints,
    load_weights,
    rank_state,
    read_checkpoint,
    remove_checkpoint,
    resolve_resume_path,
    save_checkpoint,
    save_reference,
    step_folder,
    verify,
)
from rloo.distributed import raise_on_every_process, replicated, strategy
from rloo.errors import CheckpointError
from rloo.rollout import Rollout
from rloo.run import Run
from rloo.shards import load_reference, read_parts, save_sharded
from rloo.train_state import TrainState, capture_rng, optimizer_state, restore_rng, rollout_fields

logger = logging.getLogger(__name__)


def snapshot(run: Run, state: TrainState) -> TrainState:
    """The loop's state now (RNG, data position, counters, buffered batch): what a checkpoint holds."""
    scaler = run.accelerator.scaler
    return TrainState(step=state.step, sampler=run.sampler.state_dict(), counters=dict(run.counters),
                      rollout=state.rollout, eval_before=state.eval_before, rng=capture_rng(),
                      scheduler=copy.deepcopy(run.scheduler.state_dict()),
                      scaler=dict(scaler.state_dict()) if scaler is not None else None)


def save(run: Run, state: TrainState) -> Path:
    """A committed checkpoint of ``state`` (every process's, gathered) with the current weights and
    optimizer; written by the main process while the others wait, or, where the optimizer state is shared
    out (FSDP2, DeepSpeed), each process's part by that process (shards.py)."""
    states = [state]
    if run.accelerator.num_processes > 1:
        states = [None] * run.accelerator.num_processes
        torch.distributed.all_gather_object(states, _to_cpu(state))  # in memory; files hold no pickle
    layout = strategy(run.accelerator)
    if not replicated(run.accelerator):
        path = save_sharded(layout, run.output_dir, states, run.policy, _torch_optimizer(run.optimizer), run.reference,
                            run.scheduler, run.cfg.to_dict(), fingerprint(run), run.cfg.save_total_limit,
                            run.accelerator.device)
        logger.info("checkpoint %s", path)
        return path
    path, error = None, None
    if run.accelerator.is_main_process:
        try:
            if run.reference is not None:
                save_reference(run.output_dir, run.reference)
            path = save_checkpoint(run.output_dir, run.accelerator.unwrap_model(run.policy), run.optimizer,
                                   run.scheduler, states, run.cfg.to_dict(), fingerprint(run),
                                   run.cfg.save_total_limit)
            logger.info("checkpoint %s", path)
        except CheckpointError as err:
            error = err
    # everyone learns whether process 0's save worked (and waits for it)
    raise_on_every_process(run.accelerator, error,
                           lambda: CheckpointError("process 0 could not write the checkpoint (its message is there)"))
    return path if path is not None else step_folder(run.output_dir, state.step)


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (what torch.distributed.checkpoint reads)."""
    return getattr(optimizer, "optimizer", optimizer)


def drop_final_checkpoint(final: Path) -> None:
    """Remove the checkpoint written only to keep the trained weights safe until the final folder was
    installed (``save_steps 0``), and the reference with it when no other checkpoint needs it."""
    remove_checkpoint(final)
    folder = final.parent
    if not committed_checkpoints(folder.parent):
        remove_checkpoint(folder / REFERENCE)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _to_cpu(state: TrainState) -> TrainState:
    rollout = state.rollout
    if rollout is not None:
        rollout = replace(rollout, **{f.name: getattr(rollout, f.name).cpu() for f in fields(rollout)
                                      if isinstance(getattr(rollout, f.name), torch.Tensor)})
    json_part, tensors = state.rng
    return replace(state, rollout=rollout, rng=(json_part, {name: t.cpu() for name, t in tensors.items()}))


def fingerprint(run: Run) -> dict:
    """What a resumed run must share with its checkpoint: k, batch sizes, architecture, tokenizer."""
    cfg, policy = run.cfg, run.accelerator.unwrap_model(run.policy)
    architecture = {key: value for key, value in policy.config.to_dict().items()
                    if key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "intermediate_size", "tie_word_embeddings")}
    vocab = json.dumps(sorted(run.tokenizer.get_vocab().items()))
    return {
        "num_generations": cfg.num_generations, "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "num_iterations": cfg.num_iterations,
        "num_processes": cfg.sizes.num_processes, "architecture": architecture, "precision": run.precision.name,
        "steps_per_generation": cfg.sizes.num_steps_per_generation,
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:16], "layout": layout_name(run.accelerator),
    }


def layout_name(accelerator) -> str:
    """How the checkpoint's weights and optimizer state are laid out: 'whole' (one process, DDP) or the
    strategy that shares them out ('fsdp', 'zero1'..'zero3'), which a resume must run under again."""
    return "whole" if replicated(accelerator) else strategy(accelerator)


def resume(run: Run) -> TrainState:
    """Load a checkpoint into the run: weights, reference, optimizer, scheduler, data position, RNG."""
    cfg = run.cfg
    path = resolve_resume_path(cfg.resume_from_checkpoint, run.output_dir)
    failure = None
    try:  # sizes on every process, sha256 on the main one (the files are the same for all)
        meta, tensors = read_checkpoint(path, hashes=run.accelerator.is_main_process)
        if run.reference is not None and (path.parent / REFERENCE / COMMIT_MARKER).is_file():
            verify(path.parent / REFERENCE, hashes=run.accelerator.is_main_process)
    except CheckpointError as err:
        failure = err
    raise_on_every_process(run.accelerator, failure, lambda: CheckpointError(
        f"cannot resume from {path}: process 0 found it damaged (its message is there)"))
    now = fingerprint(run)
    saved = meta.get("fingerprint", {})
    # Checkpoints from before these keys: one generation per step, the weights in torch_dtype, no autocast.
    old_dtype = {"auto": "float32"}.get(meta["config"].get("torch_dtype", "float32"), meta["config"].get("torch_dtype"))
    saved = {"steps_per_generation": 1, "precision": f"{old_dtype} weights, {old_dtype} compute", "layout": "whole",
             **saved}
    differences = [f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in now if saved.get(key) != now[key]]
    if differences and not cfg.resume_ignore_mismatch:
        raise CheckpointError(f"cannot resume from {path}: this run differs from it in {'; '.join(differences)} "
                              "(set resume_ignore_mismatch true to resume anyway)")
    kept = [f"{key} {meta['config'].get(key)!r}" for key in ("learning_rate", "lr_scheduler_type", "warmup_ratio",
            "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon") if meta["config"].get(key) != getattr(cfg, key)]
    if kept:
        logger.warning("resuming keeps the checkpoint's optimizer and schedule: %s (the values given now are not used)",
                       ", ".join(kept))
    layout = strategy(run.accelerator)
    if meta.get("layout", "whole") != layout_name(run.accelerator):  # even with resume_ignore_mismatch
        raise CheckpointError(f"cannot resume from {path}: its weights and optimizer state are laid out for "
                              f"{meta.get('layout', 'whole')}, this run is {layout_name(run.accelerator)} (resume with "
                              "the accelerate config it was written with)")
    processes, written = run.accelerator.num_processes, len(meta["ranks"])  # the same answer on every process
    if processes > written or (processes != written and meta.get("layout", "whole") != "whole"):
        raise CheckpointError(f"cannot resume from {path}: written by {len(meta['ranks'])} processes, this run has "
                              f"{run.accelerator.num_processes} (each process's state is its own part of it)")
    if meta.get("layout", "whole") == "whole":
        load_weights(run.accelerator.unwrap_model(run.policy), path)
        run.optimizer.load_state_dict(optimizer_state(meta["optimizer"], tensors["optimizer"]))
    else:
        read_parts(layout, path, run.policy, _torch_optimizer(run.optimizer), meta["optimizer"])
    if run.reference is not None:
        reference = path.parent / REFERENCE
        if not (reference / COMMIT_MARKER).is_file():
            raise CheckpointError(f"cannot resume from {path}: beta > 0 but {reference} holds no committed reference")
        load_reference(layout, run.reference, reference)
    run.scheduler.load_state_dict(meta["scheduler"])
    if run.accelerator.scaler is not None and meta.get("scaler"):  # fp16: the loss scale where it stopped
        run.accelerator.scaler.load_state_dict(meta["scaler"])
    run.sampler.load_state_dict(meta["sampler"])
    counters, rng, rollout_parts = rank_state(meta, tensors, run.accelerator.process_index)
    run.counters.update(counters)
    restore_rng(rng)
    rollout = None
    if rollout_parts is not None:
        rollout = Rollout(**rollout_fields(*rollout_parts, run.accelerator.device))
    if run.accelerator.is_main_process:
        drop_newer_checkpoints(run.output_dir, path, meta["step"])
    run.generator_stale = True  # a vLLM engine gets the checkpoint's weights before it next generates
    run.accelerator.wait_for_everyone()
    logger.info("resumed from %s (step %d)", path, meta["step"])
    return TrainState(step=meta["step"], rollout=rollout, eval_before=meta["eval_before"])



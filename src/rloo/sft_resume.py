"""What an SFT checkpoint holds besides weights and optimizer (``sft_state``), what a resumed run must share
with it (``sft_fingerprint``), and loading it back exactly (``load_sft_checkpoint``); the files are
checkpoint.py's, as for ``rloo train``."""

from __future__ import annotations

import hashlib
import json
import logging

from rloo.checkpoint import drop_newer_checkpoints, load_weights, rank_state, read_checkpoint, resolve_resume_path
from rloo.distributed import raise_on_every_process
from rloo.errors import CheckpointError
from rloo.train_state import TrainState, capture_rng, optimizer_state, restore_rng

logger = logging.getLogger(__name__)


def sft_state(run, step: int, eval_before: dict | None) -> TrainState:
    return TrainState(step=step, sampler=run.sampler.state_dict(), counters=dict(run.counters),
                      eval_before=eval_before, rng=_cpu(capture_rng()), scheduler=run.scheduler.state_dict())


def _cpu(rng):
    json_part, tensors = rng
    return json_part, {name: t.cpu() for name, t in tensors.items()}


def sft_fingerprint(run) -> dict:
    """What a resumed run must share with its checkpoint: batch sizes, processes, architecture, tokenizer,
    and the rows' tokenization (their count and trained tokens)."""
    cfg, policy = run.cfg, run.accelerator.unwrap_model(run.policy)
    architecture = {key: value for key, value in policy.config.to_dict().items()
                    if key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}
    vocab = json.dumps(sorted(run.tokenizer.get_vocab().items()))
    return {"stage": "sft", "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "num_processes": cfg.sizes.num_processes,
            "architecture": architecture, "tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:16],
            "num_rows": len(run.train.examples), "num_trained_tokens": run.train.num_trained_tokens}


def load_sft_checkpoint(run) -> tuple[int, dict | None]:
    """Weights, optimizer, schedule, data position, counters and RNG from the checkpoint; -> (its step, the
    evaluation before training it holds)."""
    path = resolve_resume_path(run.cfg.resume_from_checkpoint, run.output_dir)
    failure = None
    try:
        meta, tensors = read_checkpoint(path, hashes=run.accelerator.is_main_process)
    except CheckpointError as err:
        failure = err
    raise_on_every_process(run.accelerator, failure, lambda: CheckpointError(
        f"cannot resume from {path}: process 0 found it damaged (its message is there)"))
    saved, now = meta.get("fingerprint", {}), sft_fingerprint(run)
    differences = [f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in now if saved.get(key) != now[key]]
    if differences and (saved.get("stage") != "sft" or not run.cfg.resume_ignore_mismatch):
        raise CheckpointError(f"cannot resume from {path}: this run differs from it in {'; '.join(differences)}"
                              + ("" if saved.get("stage") != "sft" else " (set resume_ignore_mismatch true to resume anyway)"))
    load_weights(run.accelerator.unwrap_model(run.policy), path)
    run.optimizer.load_state_dict(optimizer_state(meta["optimizer"], tensors["optimizer"]))
    run.scheduler.load_state_dict(meta["scheduler"])
    run.sampler.load_state_dict(meta["sampler"])
    counters, rng, _ = rank_state(meta, tensors, run.accelerator.process_index)
    run.counters.update(counters)
    restore_rng(rng)
    if run.accelerator.is_main_process:
        drop_newer_checkpoints(run.output_dir, path, meta["step"])
    run.accelerator.wait_for_everyone()
    logger.info("resumed from %s (step %d)", path, meta["step"])
    return meta["step"], meta["eval_before"]

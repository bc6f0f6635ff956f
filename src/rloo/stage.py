"""The shape every supervised stage shares (``rloo sft``, ``rloo reward-model``), as ``rloo train`` has it: the
run folder claimed and locked before anything loads (run.claim_output_dir, with the trackers and Hub
checked), metrics.jsonl and the trackers through RunLog, checkpoints committed and resumed exactly
(checkpoint.py), SIGINT / SIGTERM finishing the step with a checkpoint, the final folder written whole or
not at all (final.py). A stage says only what differs (``Stage``): its items, its loss, its held-out
figures, what a resume must share, and its run folder.

One optimizer step takes ``per_device_train_batch_size * gradient_accumulation_steps * processes`` items in
a seeded order, a new permutation each epoch; each micro-batch's loss is its items' summed loss over the
step's ``Stage.weight`` (trained tokens, pairs), so accumulation and processes give one large batch's
gradient.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

from rloo.checkpoint import (drop_newer_checkpoints, load_weights, rank_state, read_checkpoint, resolve_resume_path,
                             save_checkpoint, step_folder)
from rloo.data import load_rows
from rloo.distributed import raise_on_every_process, replicated
from rloo.errors import CheckpointError, TrainingInterrupted
from rloo.resume import drop_final_checkpoint
from rloo.run import claim_output_dir, make_accelerator
from rloo.run_eval import eval_interval
from rloo.run_log import RunLog
from rloo.train_state import TrainState, capture_rng, optimizer_state, restore_rng
from rloo.trainer import stop_on_signals

logger = logging.getLogger(__name__)


class RowSampler:
    """Item indices for each step: a seeded permutation per epoch, continued across epochs; its state
    (epoch, position) is in every checkpoint."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch, self.position = num_rows, seed, 0, 0

    def _order(self) -> list[int]:
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, n: int) -> list[int]:
        rows = []
        while len(rows) < n:
            part = self._order()[self.position: self.position + n - len(rows)]
            rows += part
            self.position += len(part)
            if self.position >= self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclass
class StageSizes:
    max_steps: int
    rows_per_step: int  # per_device_train_batch_size * gradient_accumulation_steps * processes
    num_processes: int


class Stage:
    """What one stage adds to the shared loop. ``train`` / ``held_out``: its items (tokenized rows)."""

    name = "stage"
    unit = "items"  # what ``weight`` counts (metric num_<unit>)
    train: list = []
    held_out: list = []

    def weight(self, items: list) -> int:
        """The step's normaliser: what its loss is a mean over (trained tokens, pairs)."""
        raise NotImplementedError

    def micro_loss(self, run: "StageRun", items: list, weight: int) -> torch.Tensor:
        """This micro-batch's items' summed loss over the step's ``weight``."""
        raise NotImplementedError

    def evaluate(self, run: "StageRun") -> dict | None:
        """Held-out figures (logged as eval/<name>), or None without held-out items."""
        raise NotImplementedError

    def fingerprint(self, run: "StageRun") -> dict:
        """What a resumed run must share with its checkpoint, besides sizes, architecture and tokenizer."""
        return {}

    def write_folder(self, run: "StageRun", before: dict | None, after: dict | None, checkpoint: Path,
                     tracker_links: dict[str, str]) -> None:
        raise NotImplementedError


@dataclass
class StageRun:
    cfg: Any
    accelerator: Any
    policy: torch.nn.Module  # the model trained (a causal LM, a sequence classifier)
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    output_dir: Path
    model_name: str
    sampler: RowSampler
    dropout_rates: dict
    example_prompt: Any = None
    counters: dict = field(default_factory=lambda: {"num_items": 0, "num_nonfinite_steps": 0})
    stop_signal: int | None = None
    lock: Any = None
    trackers: list = field(default_factory=list)
    hub_repo: str | None = None


@dataclass
class StageResult:
    output_dir: Path
    eval_before: dict | None
    eval_after: dict | None
    metrics: list[dict]
    config: Any


@dataclass
class Opening:
    """A stage's run as it starts: the accelerator, its claimed and locked folder, the rows."""

    accelerator: Any
    output_dir: Path
    lock: Any
    trackers: list
    hub_repo: str | None
    model_name: str
    train_rows: Any
    held_rows: list[dict]

    def run(self, cfg, model, tokenizer, num_items: int, dropout: dict, example) -> StageRun:
        """The StageRun over ``model`` (optimizer, schedule and sizes for ``num_items`` training items)."""
        set_seed(cfg.seed)
        model, optimizer, scheduler = optimize(cfg, self.accelerator, model, num_items)
        return StageRun(cfg, self.accelerator, model, tokenizer, optimizer, scheduler, self.output_dir, self.model_name,
                        RowSampler(num_items, cfg.seed), dropout, example_prompt=example, lock=self.lock,
                        trackers=self.trackers, hub_repo=self.hub_repo)


@contextmanager
def opening(cfg, model, train_dataset, eval_dataset, what_model: str, what_rows: str):
    """Check the config, claim the run folder (lock held), load the rows; the lock released if the block fails.
    ``what_model`` / ``what_rows``: what the stage needs, for the one-line errors."""
    cfg.resolve()
    if model is None and cfg.model_name_or_path is None:
        raise ValueError(f"model_name_or_path: name {what_model} (a folder or hub id; model=... in Python)")
    if train_dataset is None and cfg.dataset_name is None:
        raise ValueError(f"dataset_name: give {what_rows}")
    accelerator, output_dir, lock, trackers, hub_repo = claim(cfg)
    try:
        model_name = model if isinstance(model, str) else cfg.model_name_or_path if model is None else (
            getattr(model, "name_or_path", "") or "an in-memory model")
        train_rows = load_rows(train_dataset if train_dataset is not None else cfg.dataset_name, cfg.dataset_train_split)
        held_rows = held_out_rows(cfg, eval_dataset, load_rows)
        if cfg.eval_strategy == "steps" and not held_rows:
            raise ValueError("eval_strategy steps: the run has no held-out rows (num_eval_samples 0, or a dataset without "
                             "the split dataset_eval_split names); give eval_dataset / dataset_eval_split, or eval_strategy no")
        yield Opening(accelerator, output_dir, lock, trackers, hub_repo, model_name, train_rows, held_rows)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def claim(cfg):
    """The accelerator and the claimed, locked run folder: (accelerator, output_dir, lock, trackers, hub_repo)."""
    if cfg.resume_from_checkpoint not in (None, "latest") and cfg.output_dir is None:
        cfg.output_dir = str(Path(cfg.resume_from_checkpoint).parent.parent)  # <run>/checkpoints/step-N
    accelerator = make_accelerator(cfg)
    if not replicated(accelerator):
        raise ValueError(f"accelerate config: rloo {getattr(cfg, 'STAGE', 'stage')} runs on one process or DDP for "
                         "now, not FSDP / DeepSpeed")
    return (accelerator, *claim_output_dir(cfg, accelerator))


def optimize(cfg, accelerator, model, num_items: int):
    """(model, AdamW, schedule) prepared by accelerate, and the sizes, for ``num_items`` training items."""
    processes = accelerator.num_processes
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
    max_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * num_items / per_step))
    object.__setattr__(cfg, "sizes", StageSizes(max_steps, per_step, processes))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps * max_steps if 0 < cfg.warmup_steps < 1 else cfg.warmup_steps or cfg.warmup_ratio * max_steps
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=int(warmup), num_training_steps=max_steps,
                              scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or {})
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def run_stage(run: StageRun, stage: Stage) -> StageResult:
    """The loop, from a fresh start or the checkpoint asked for, to the final folder; the lock released."""
    try:
        with stop_on_signals(run):
            return _run(run, stage)
    finally:
        if run.lock is not None:
            run.lock.release()


def _run(run: StageRun, stage: Stage) -> StageResult:
    cfg = run.cfg
    resuming = cfg.resume_from_checkpoint is not None
    step, eval_before = load_stage_checkpoint(run, stage) if resuming else (0, None)
    log = RunLog(run, resume_step=step if resuming else None, completions=False)
    eval_after = None
    try:
        if not resuming and cfg.eval_on_start:
            eval_before = stage.evaluate(run)
            if eval_before is not None:
                log.evaluation({"step": 0, **{f"eval/{k}": v for k, v in eval_before.items()}})
        every = eval_interval(cfg)  # eval_strategy steps: every eval_steps (the last step's is eval_after)
        while step < cfg.sizes.max_steps:
            step += 1
            metrics = training_step(run, stage, step)
            log.step(metrics, None)
            if every and step % every == 0 and step < cfg.sizes.max_steps:
                figures = stage.evaluate(run)
                if figures is not None:
                    log.evaluation({"step": step, **{f"eval/{k}": v for k, v in figures.items()}})
            if log.is_logged(step) and run.accelerator.is_main_process:
                print(f"step {step}/{cfg.sizes.max_steps} loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.3g}",
                      flush=True)
            if cfg.save_steps and step % cfg.save_steps == 0:
                log.checkpoint_saved(save_stage(run, stage, step, eval_before), step)
            if _stop_asked(run):
                raise TrainingInterrupted(signal.Signals(run.stop_signal).name, step,
                                          save_stage(run, stage, step, eval_before))
        final = save_stage(run, stage, step, eval_before)  # the trained weights, before anything else can fail
        eval_after = stage.evaluate(run)
        if eval_after is not None:
            log.evaluation({"step": step, **{f"eval/{k}": v for k, v in eval_after.items()}})
        log.close()
        if run.accelerator.is_main_process:
            stage.write_folder(run, eval_before, eval_after, final, log.tracker_links)
            if not cfg.save_steps:
                drop_final_checkpoint(final)
    except BaseException:
        log.close(failed=True)
        raise
    run.accelerator.wait_for_everyone()
    if log.publisher is not None:
        logger.info("pushed to %s", log.publisher.push_folder(run.output_dir))
    return StageResult(run.output_dir, eval_before, eval_after, log.history, cfg)


def training_step(run: StageRun, stage: Stage, step: int) -> dict:
    """One optimizer step over the next items: micro-batches of this process's share, each one's loss over the
    step's weight (every process's items), gradients clipped, AdamW, the schedule."""
    cfg, accelerator = run.cfg, run.accelerator
    start = time.perf_counter()
    items = [stage.train[i] for i in run.sampler.take(cfg.sizes.rows_per_step)]
    weight = stage.weight(items)  # every process sees the whole step's items
    per_process = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    mine = items[accelerator.process_index * per_process:(accelerator.process_index + 1) * per_process]
    run.policy.train()
    total = torch.zeros((), device=accelerator.device)
    for micro in range(cfg.gradient_accumulation_steps):
        part = mine[micro * cfg.per_device_train_batch_size:(micro + 1) * cfg.per_device_train_batch_size]
        last = micro == cfg.gradient_accumulation_steps - 1
        with accelerator.no_sync(run.policy) if not last and accelerator.num_processes > 1 else nullcontext():
            with accelerator.autocast():
                loss = stage.micro_loss(run, part, weight)
            accelerator.backward(loss * accelerator.num_processes)  # DDP averages the processes' gradients
        total += loss.detach()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    grad_norm = accelerator.clip_grad_norm_(run.policy.parameters(), cfg.max_grad_norm or float("inf"))
    if bool(torch.isfinite(total).item() and torch.isfinite(torch.as_tensor(grad_norm)).item()):
        run.optimizer.step()
    else:
        run.counters["num_nonfinite_steps"] += 1
        logger.warning("step %d: a non-finite loss or gradient; the update is skipped", step)
    run.optimizer.zero_grad(set_to_none=True)
    learning_rate = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.counters["num_items"] += weight
    return {"step": step, "loss": total.item(), "grad_norm": float(grad_norm), "learning_rate": learning_rate,
            f"num_{stage.unit}": run.counters["num_items"],
            "epoch": run.sampler.epoch + run.sampler.position / run.sampler.num_rows,
            "num_nonfinite_steps": run.counters["num_nonfinite_steps"], "step_seconds": time.perf_counter() - start}


def _stop_asked(run: StageRun) -> bool:
    if run.accelerator.num_processes > 1:
        flag = torch.tensor([run.stop_signal or 0], device=run.accelerator.device)
        run.stop_signal = int(run.accelerator.reduce(flag, "max").item()) or None
    return run.stop_signal is not None


# ---------------------------------------------------------------------------------------- checkpoints
def fingerprint(run: StageRun, stage: Stage) -> dict:
    """What a resumed run must share with its checkpoint: the stage, batch sizes, processes, architecture,
    tokenizer, and the stage's own (its items)."""
    cfg, model = run.cfg, run.accelerator.unwrap_model(run.policy)
    architecture = {key: value for key, value in model.config.to_dict().items()
                    if key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}
    vocab = json.dumps(sorted(run.tokenizer.get_vocab().items()))
    return {"stage": stage.name, "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "num_processes": cfg.sizes.num_processes,
            "architecture": architecture, "tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:16],
            "num_items": len(stage.train), **stage.fingerprint(run)}


def _state(run: StageRun, step: int, eval_before: dict | None) -> TrainState:
    json_part, tensors = capture_rng()
    return TrainState(step=step, sampler=run.sampler.state_dict(), counters=dict(run.counters), eval_before=eval_before,
                      rng=(json_part, {name: t.cpu() for name, t in tensors.items()}),
                      scheduler=run.scheduler.state_dict())


def save_stage(run: StageRun, stage: Stage, step: int, eval_before: dict | None) -> Path:
    """A committed checkpoint at ``step`` (the main process writes it; every process learns how it went)."""
    states = [_state(run, step, eval_before)]
    if run.accelerator.num_processes > 1:
        states = [None] * run.accelerator.num_processes
        torch.distributed.all_gather_object(states, _state(run, step, eval_before))
    error = None
    if run.accelerator.is_main_process:
        try:
            save_checkpoint(run.output_dir, run.accelerator.unwrap_model(run.policy), run.optimizer, run.scheduler,
                            states, run.cfg.to_dict(), fingerprint(run, stage), run.cfg.save_total_limit)
        except CheckpointError as err:
            error = err
    raise_on_every_process(run.accelerator, error,
                           lambda: CheckpointError("process 0 could not write the checkpoint (its message is there)"))
    return step_folder(run.output_dir, step)


def load_stage_checkpoint(run: StageRun, stage: Stage) -> tuple[int, dict | None]:
    """Weights, optimizer, schedule, data position, counters and RNG from the checkpoint; -> (its step, the
    evaluation before training that it holds)."""
    path = resolve_resume_path(run.cfg.resume_from_checkpoint, run.output_dir)
    failure = None
    try:
        meta, tensors = read_checkpoint(path, hashes=run.accelerator.is_main_process)
    except CheckpointError as err:
        failure = err
    raise_on_every_process(run.accelerator, failure, lambda: CheckpointError(
        f"cannot resume from {path}: process 0 found it damaged (its message is there)"))
    saved, now = meta.get("fingerprint", {}), fingerprint(run, stage)
    differences = [f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in now if saved.get(key) != now[key]]
    other_stage = saved.get("stage") != stage.name
    if differences and (other_stage or not run.cfg.resume_ignore_mismatch):
        raise CheckpointError(f"cannot resume from {path}: this run differs from it in {'; '.join(differences)}"
                              + ("" if other_stage else " (set resume_ignore_mismatch true to resume anyway)"))
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


def held_out_rows(cfg, eval_dataset, load) -> list[dict]:
    """The first ``num_eval_samples`` rows of the held-out split (``load(name, split)``); none without one."""
    if cfg.num_eval_samples == 0:
        return []
    if eval_dataset is None and cfg.dataset_name:
        try:
            eval_dataset = load(cfg.dataset_name, cfg.dataset_eval_split)
        except ValueError as err:
            if "has no split" not in str(err):
                raise
            logger.warning("%s: training without held-out figures", err)
            return []
    if eval_dataset is None:
        return []
    return [eval_dataset[i] for i in range(min(cfg.num_eval_samples, len(eval_dataset)))]

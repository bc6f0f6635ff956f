"""``sft(cfg)``: supervised fine-tuning (``rloo sft``), the first stage of the rloo_tldr recipe, in the same
shape as ``rloo train``: the run folder claimed and locked (run.claim_output_dir), the trackers and Hub
checked before anything loads, metrics.jsonl and the trackers through RunLog, checkpoints committed and
resumed exactly (checkpoint.py), SIGINT / SIGTERM finishing the step with a checkpoint, and the final
folder written whole or not at all (final.py) with its model card.

One optimizer step takes ``per_device_train_batch_size * gradient_accumulation_steps * processes`` rows
in a seeded order, a new permutation each epoch; its loss is the mean negative log-likelihood of its
trained tokens (sft_objective.py); the held-out completion loss is measured before and after.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

from rloo.checkpoint import save_checkpoint, step_folder
from rloo.data import load_rows
from rloo.distributed import raise_on_every_process, replicated
from rloo.errors import CheckpointError, TrainingInterrupted
from rloo.resume import drop_final_checkpoint
from rloo.run import claim_output_dir, load_model, make_accelerator
from rloo.run_log import RunLog
from rloo.sft_config import SFTConfig
from rloo.sft_data import SFTExamples, tokenize_sft
from rloo.sft_folder import save_sft_folder
from rloo.sft_objective import sft_batch, sft_loss
from rloo.sft_resume import load_sft_checkpoint, sft_fingerprint, sft_state
from rloo.trainer import stop_on_signals

logger = logging.getLogger(__name__)


@dataclass
class SFTSizes:
    max_steps: int
    rows_per_step: int  # per_device_train_batch_size * gradient_accumulation_steps * processes
    num_processes: int


class RowSampler:
    """Dataset rows for each step: a seeded permutation per epoch, continued across epochs; its state
    (epoch, position) is in every checkpoint."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch, self.position = num_rows, seed, 0, 0

    def _order(self) -> list[int]:
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, n: int) -> list[int]:
        rows = []
        while len(rows) < n:
            order = self._order()
            part = order[self.position: self.position + n - len(rows)]
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
class SFTRun:
    cfg: SFTConfig
    accelerator: Any
    policy: torch.nn.Module
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    output_dir: Path
    model_name: str
    train: SFTExamples
    held_out: SFTExamples | None
    sampler: RowSampler
    dropout_rates: dict
    example_prompt: Any = None
    counters: dict = field(default_factory=lambda: {"num_tokens": 0, "num_nonfinite_steps": 0})
    stop_signal: int | None = None
    lock: Any = None
    trackers: list = field(default_factory=list)
    hub_repo: str | None = None


@dataclass
class SFTResult:
    output_dir: Path
    eval_before: dict | None
    eval_after: dict | None
    metrics: list[dict]
    config: SFTConfig


def sft(config: SFTConfig | None = None, *, model: str | torch.nn.Module | None = None, tokenizer: Any = None,
        train_dataset: Any = None, eval_dataset: Any = None) -> SFTResult:
    """Supervised fine-tuning of a causal LM; TRL's ``SFTTrainer(model, args, train_dataset, eval_dataset,
    processing_class)`` maps to ``sft(args, model=..., train_dataset=..., tokenizer=...)``."""
    cfg = copy.deepcopy(config) if config is not None else SFTConfig()
    run = setup_sft(cfg, model, tokenizer, train_dataset, eval_dataset)
    try:
        with stop_on_signals(run):
            return _sft(run)
    finally:
        if run.lock is not None:
            run.lock.release()


def setup_sft(cfg: SFTConfig, model, tokenizer, train_dataset, eval_dataset) -> SFTRun:
    cfg.resolve()
    if model is None and cfg.model_name_or_path is None:
        raise ValueError("model_name_or_path: name the model to fine-tune (a folder or hub id; sft(model=...) in Python)")
    if train_dataset is None and cfg.dataset_name is None:
        raise ValueError("dataset_name: give the rows to train on (prompt/completion, messages or text), e.g. rloo:tldr")
    if cfg.resume_from_checkpoint not in (None, "latest") and cfg.output_dir is None:
        cfg.output_dir = str(Path(cfg.resume_from_checkpoint).parent.parent)  # <run>/checkpoints/step-N
    accelerator = make_accelerator(cfg)
    if not replicated(accelerator):
        raise ValueError("accelerate config: rloo sft runs on one process or DDP for now, not FSDP / DeepSpeed")
    output_dir, lock, trackers, hub_repo = claim_output_dir(cfg, accelerator)
    try:
        model_name = model if isinstance(model, str) else cfg.model_name_or_path if model is None else (
            getattr(model, "name_or_path", "") or "an in-memory model")
        train_rows = load_rows(train_dataset if train_dataset is not None else cfg.dataset_name, cfg.dataset_train_split)
        held_rows = _held_out_rows(cfg, eval_dataset)
        policy, tokenizer, _, dropout = load_model(cfg, model, tokenizer)
        settings = dict(max_length=cfg.max_length, completion_only_loss=cfg.completion_only_loss,
                        assistant_only_loss=cfg.assistant_only_loss, dataset_text_field=cfg.dataset_text_field,
                        eos_token=cfg.eos_token)
        train = tokenize_sft(train_rows, tokenizer, **settings)
        if not train.examples:
            raise ValueError(f"max_length {cfg.max_length}: every training row is longer than that before its first "
                             "trained token, so none is left")
        held_out = tokenize_sft(held_rows, tokenizer, **settings) if held_rows else None
        processes = accelerator.num_processes
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
        max_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * len(train.examples)
                                                                            / per_step))
        object.__setattr__(cfg, "sizes", SFTSizes(max_steps, per_step, processes))
        set_seed(cfg.seed)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps * max_steps if 0 < cfg.warmup_steps < 1 else cfg.warmup_steps or cfg.warmup_ratio * max_steps
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=int(warmup),
                                  num_training_steps=max_steps, scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or {})
        policy, optimizer = accelerator.prepare(policy, optimizer)
        example = train_rows[0].get("prompt", train_rows[0].get("messages", ""))
        return SFTRun(cfg, accelerator, policy, tokenizer, optimizer, scheduler, output_dir, model_name, train, held_out,
                      RowSampler(len(train.examples), cfg.seed), dropout, example_prompt=example, lock=lock,
                      trackers=trackers, hub_repo=hub_repo)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _held_out_rows(cfg: SFTConfig, eval_dataset) -> list[dict]:
    if cfg.num_eval_samples == 0:
        return []
    if eval_dataset is None:
        try:
            eval_dataset = load_rows(cfg.dataset_name, cfg.dataset_eval_split) if cfg.dataset_name else None
        except ValueError as err:
            if "has no split" not in str(err):
                raise
            logger.warning("%s: training without a held-out loss", err)
            return []
    if eval_dataset is None:
        return []
    return [eval_dataset[i] for i in range(min(cfg.num_eval_samples, len(eval_dataset)))]


def _sft(run: SFTRun) -> SFTResult:
    cfg = run.cfg
    resuming = cfg.resume_from_checkpoint is not None
    step, eval_before = load_sft_checkpoint(run) if resuming else (0, None)
    log = RunLog(run, resume_step=step if resuming else None, completions=False)
    eval_after = None
    try:
        if not resuming and cfg.eval_on_start:
            eval_before = held_out_loss(run)
            if eval_before is not None:
                log.evaluation({"step": 0, **{f"eval/{k}": v for k, v in eval_before.items()}})
        while step < cfg.sizes.max_steps:
            step += 1
            metrics = training_step(run, step)
            log.step(metrics, None)
            if log.is_logged(step) and run.accelerator.is_main_process:
                print(f"step {step}/{cfg.sizes.max_steps} loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.3g}",
                      flush=True)
            if cfg.save_steps and step % cfg.save_steps == 0:
                log.checkpoint_saved(save_sft(run, step, eval_before), step)
            if _stop_asked(run):
                raise TrainingInterrupted(signal.Signals(run.stop_signal).name, step, save_sft(run, step, eval_before))
        final = save_sft(run, step, eval_before)  # the trained weights, before anything else can fail
        eval_after = held_out_loss(run)
        if eval_after is not None:
            log.evaluation({"step": step, **{f"eval/{k}": v for k, v in eval_after.items()}})
        log.close()
        if run.accelerator.is_main_process:
            save_sft_folder(run, eval_before, eval_after, checkpoint=final, tracker_links=log.tracker_links)
            if not cfg.save_steps:
                drop_final_checkpoint(final)
    except BaseException:
        log.close(failed=True)
        raise
    run.accelerator.wait_for_everyone()
    if log.publisher is not None:
        logger.info("pushed to %s", log.publisher.push_folder(run.output_dir))
    return SFTResult(run.output_dir, eval_before, eval_after, log.history, cfg)


def training_step(run: SFTRun, step: int) -> dict:
    """One optimizer step over the next rows: micro-batches of this process's share, the loss of each over
    the step's trained tokens (all processes'), gradients clipped, AdamW, the schedule."""
    cfg, accelerator = run.cfg, run.accelerator
    start = time.perf_counter()
    rows = run.sampler.take(cfg.sizes.rows_per_step)
    examples = [run.train.examples[i] for i in rows]
    num_items = sum(sum(e.loss_mask[1:]) for e in examples)  # every process sees the whole step's rows
    per_process = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    mine = examples[accelerator.process_index * per_process:(accelerator.process_index + 1) * per_process]
    run.policy.train()
    total = torch.zeros((), device=accelerator.device)
    for micro in range(cfg.gradient_accumulation_steps):
        part = mine[micro * cfg.per_device_train_batch_size:(micro + 1) * cfg.per_device_train_batch_size]
        batch = sft_batch(part, run.tokenizer.pad_token_id).to(accelerator.device)
        last = micro == cfg.gradient_accumulation_steps - 1
        with (accelerator.no_sync(run.policy) if not last and accelerator.num_processes > 1 else _nothing()):
            with accelerator.autocast():
                loss, _ = sft_loss(run.policy, batch, num_items)
            accelerator.backward(loss * accelerator.num_processes)  # DDP averages the processes' gradients
        total += loss.detach()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    grad_norm = accelerator.clip_grad_norm_(run.policy.parameters(), cfg.max_grad_norm or float("inf"))
    finite = bool(torch.isfinite(total).item() and torch.isfinite(torch.as_tensor(grad_norm)).item())
    if finite:
        run.optimizer.step()
    else:
        run.counters["num_nonfinite_steps"] += 1
        logger.warning("step %d: a non-finite loss or gradient; the update is skipped", step)
    run.optimizer.zero_grad(set_to_none=True)
    learning_rate = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.counters["num_tokens"] += num_items
    return {"step": step, "loss": total.item(), "grad_norm": float(grad_norm), "learning_rate": learning_rate,
            "num_tokens": run.counters["num_tokens"], "epoch": run.sampler.epoch + run.sampler.position / run.sampler.num_rows,
            "num_nonfinite_steps": run.counters["num_nonfinite_steps"], "step_seconds": time.perf_counter() - start}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def held_out_loss(run: SFTRun) -> dict | None:
    """The mean negative log-likelihood per trained token of the held-out rows (the completion loss on
    prompt/completion rows), and its perplexity; the rows split over the processes."""
    if run.held_out is None or not run.held_out.examples:
        return None
    accelerator, examples = run.accelerator, run.held_out.examples
    mine = examples[accelerator.process_index::accelerator.num_processes]
    run.policy.eval()
    sums = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    size = run.cfg.per_device_train_batch_size
    for start in range(0, len(mine), size):
        batch = sft_batch(mine[start:start + size], run.tokenizer.pad_token_id).to(accelerator.device)
        with accelerator.autocast():
            loss, _ = sft_loss(run.policy, batch, 1)
        sums += torch.tensor([loss.item(), batch.num_trained_tokens], device=sums.device, dtype=torch.float64)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, "sum")
    mean = (sums[0] / sums[1]).item()
    return {"loss": mean, "perplexity": math.exp(mean) if mean < 50 else float("inf"), "num_rows": len(examples),
            "num_tokens": int(sums[1].item())}


def save_sft(run: SFTRun, step: int, eval_before: dict | None) -> Path:
    """A committed checkpoint of the run at ``step`` (the main process writes it; every process learns how it
    went)."""
    states = [sft_state(run, step, eval_before)]
    if run.accelerator.num_processes > 1:
        states = [None] * run.accelerator.num_processes
        torch.distributed.all_gather_object(states, sft_state(run, step, eval_before))
    error = None
    if run.accelerator.is_main_process:
        try:
            save_checkpoint(run.output_dir, run.accelerator.unwrap_model(run.policy), run.optimizer, run.scheduler,
                            states, run.cfg.to_dict(), sft_fingerprint(run), run.cfg.save_total_limit)
        except CheckpointError as err:
            error = err
    raise_on_every_process(run.accelerator, error,
                           lambda: CheckpointError("process 0 could not write the checkpoint (its message is there)"))
    return step_folder(run.output_dir, step)


def _stop_asked(run: SFTRun) -> bool:
    if run.accelerator.num_processes > 1:
        flag = torch.tensor([run.stop_signal or 0], device=run.accelerator.device)
        run.stop_signal = int(run.accelerator.reduce(flag, "max").item()) or None
    return run.stop_signal is not None


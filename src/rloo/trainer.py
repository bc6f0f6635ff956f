"""``train(cfg)``: set up once, then the RLOO loop as numbered phases.

    1 sample   k completions per prompt (generation backend)
    2 score    reward sources -> weighted score (rollout.score)
    3 ref      reference log-probs, only when beta > 0
    4 update   advantages + clipped policy gradient over micro-batches (objective.py)
    5 log      metrics.jsonl, progress bar
    6 save     checkpoints, final model folder with its model card
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from rloo.adapters import adapters_off, has_adapters
from rloo.checkpoint import committed_checkpoints
from rloo.config import RLOOConfig
from rloo.data import gather_rows, render_prompt, tokenize_prompts
from rloo.distributed import full_state_dict, gathered_for_generation, raise_on_every_process
from rloo.errors import (
    GenerationServerError,
    NonFiniteTrainingError,
    NonFiniteWeightsError,
    RewardFunctionError,
    StopNow,
    TrainingInterrupted,
)
from rloo.generation import prompt_seeds
from rloo.metrics import step_metrics, timed
from rloo.resume import drop_final_checkpoint, resume, save, snapshot
from rloo.rollout import Rollout, add_advantages, add_logprobs, sample, score
from rloo.run import Run, setup, sync_generator, trainer_state
from rloo.run_eval import eval_interval, eval_line, run_evaluation, summarize
from rloo.run_folder import save_run_folder
from rloo.run_log import RunLog, completion_rows
from rloo.train_state import TrainState
from rloo.update import across_processes, normalize_over_processes, policy_update

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    eval_before: dict | None
    eval_after: dict | None
    metrics: list[dict]
    config: RLOOConfig  # the resolved config of the run (the one passed in is left unchanged)


def train(
    config: RLOOConfig | None = None,
    *,
    model: str | torch.nn.Module | None = None,
    tokenizer: Any = None,
    rewards: Sequence[str | Callable] | str | Callable | None = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    reward_processing_classes: Any = None,
    peft_config: Any = None,
) -> TrainResult:
    """Fine-tune a causal LM with RLOO; TRL's ``RLOOTrainer(model, reward_funcs, args, train_dataset, ...)``
    maps to ``train(args, model=..., rewards=..., train_dataset=...)``.

    ``config``: an RLOOConfig (default: the library defaults, TRL's where TRL has the field). ``model``,
    ``rewards`` and the datasets override the config's names; ``rewards`` is one source or a list, each a
    callable with TRL's reward contract (``rloo.rewards``), a spec string, or a sequence-classification
    model (its tokenizer in ``reward_processing_classes``, aligned with ``rewards``, TRL's name). ``peft_config``
    (a ``peft.LoraConfig``, TRL's name) or ``use_peft`` trains LoRA adapters, the base model as the reference.

    Checkpoints every ``save_steps`` (checkpoint.py); ``resume_from_checkpoint`` continues a run
    bit-identically. SIGINT / SIGTERM finish the step, write a checkpoint and raise TrainingInterrupted;
    a reward function that raises, or ``max_nonfinite_steps`` skipped steps in a row, write a checkpoint
    of the state before the failing step and raise."""
    cfg = copy.deepcopy(config) if config is not None else RLOOConfig()
    run = setup(cfg, model, tokenizer, rewards, train_dataset, eval_dataset, reward_processing_classes, peft_config)
    try:
        with stop_on_signals(run):
            return _train(run)
    finally:
        try:
            run.generator.close()  # a vLLM engine's processes
        finally:
            if run.lock is not None:
                run.lock.release()  # the folder is free for the next run (its resume, say)


def _train(run: Run) -> TrainResult:
    cfg, sizes = run.cfg, run.cfg.sizes
    state = resume(run) if cfg.resume_from_checkpoint else TrainState()
    log = RunLog(run, resume_step=state.step if cfg.resume_from_checkpoint else None)
    try:
        if not cfg.resume_from_checkpoint and cfg.eval_on_start:
            state.eval_before = run_evaluation(run, 0)
            if state.eval_before is not None:
                log.evaluation(eval_line(0, state.eval_before))
        if not cfg.resume_from_checkpoint:
            stop_if_asked(run, state)
        train_loop(run, state, log)
        final = save(run, snapshot(run, state))  # the trained weights, before anything else can fail
        eval_after = run_evaluation(run, sizes.max_steps)
        stop_if_asked(run, state)  # a signal during the last evaluation: resuming redoes only the evaluation
        if eval_after is not None:
            log.evaluation(eval_line(sizes.max_steps, eval_after))
        summary = summarize(state.eval_before, eval_after)
        weights = full_state_dict(run.accelerator, run.policy)  # gathered from the shards by every process
        log.close()  # the trackers' runs end; their link goes in the card
        if run.accelerator.is_main_process:  # phase 6
            save_run_folder(run, summary, weights, checkpoint=final, tracker_links=log.tracker_links)
            if not cfg.save_steps and final is not None:  # no checkpoints asked for: the final write's insurance
                drop_final_checkpoint(final)
    except BaseException:
        log.close(failed=True)
        raise
    run.accelerator.wait_for_everyone()  # the run folder is complete when train() returns, on every process
    if log.publisher is not None:  # process 0, after the barrier: an hour-long upload keeps no process waiting
        logger.info("pushed to %s", log.publisher.push_folder(run.output_dir))
    return TrainResult(run.output_dir, state.eval_before, eval_after, log.history, cfg)


def train_loop(run: Run, state: TrainState, log: RunLog) -> None:
    """Phases 1-6 of every step from the state's to max_steps; a periodic evaluation after its steps."""
    cfg, sizes = run.cfg, run.cfg.sizes
    every = eval_interval(cfg)
    progress = tqdm(total=sizes.max_steps, initial=state.step, desc="rloo",
                    disable=cfg.disable_tqdm or not run.accelerator.is_main_process)
    try:
        for step in range(state.step + 1, sizes.max_steps + 1):
            before = snapshot(run, state)  # where this step starts: saved if the step fails
            try:
                metrics, rows = training_step(run, state, step, log)
            except NonFiniteWeightsError as err:  # the weights in memory are broken: nothing of them is saved
                newest = committed_checkpoints(run.output_dir)
                kept = f"the newest checkpoint is {newest[-1]}" if newest else "no checkpoint was written"
                raise NonFiniteWeightsError(f"step {step}: {err}; nothing saved, {kept}") from err
            except (RewardFunctionError, NonFiniteTrainingError, GenerationServerError) as err:
                where = save(run, before)
                raise type(err)(f"step {step}: {err}; the state before this step is saved in {where}") from err
            log.step(metrics, rows)  # phase 5
            if log.is_logged(step) and progress.disable and run.accelerator.is_main_process:  # no bar: a line
                print(f"step {step}/{sizes.max_steps} reward {_fmt(metrics['reward'])} kl {_fmt(metrics['kl'])} "
                      f"episodes/s {metrics['episodes_per_s']:.1f}", flush=True)
            progress.set_postfix(reward=_fmt(metrics["reward"], 3), kl=_fmt(metrics["kl"], 3),
                                 eps=f"{metrics['episodes_per_s']:.1f}")
            progress.update(1)
            # before the checkpoint: a run killed during it redoes the step and its evaluation on resume
            if every and step % every == 0 and step != sizes.max_steps:  # the last one is the run's "after"
                result = run_evaluation(run, step)
                if result is not None:
                    log.evaluation(eval_line(step, result))
            if cfg.save_steps and step % cfg.save_steps == 0:
                log.checkpoint_saved(save(run, snapshot(run, state)), step)
            stop_if_asked(run, state)
    finally:
        progress.close()


def stop_if_asked(run: Run, state: TrainState) -> None:
    """After SIGINT / SIGTERM (on any process: all stop together): a checkpoint of the state now, then
    TrainingInterrupted."""
    if run.accelerator.num_processes > 1:
        flag = torch.tensor([run.stop_signal or 0], device=run.accelerator.device)
        run.stop_signal = int(run.accelerator.reduce(flag, "max").item()) or None
    if run.stop_signal is not None:
        checkpoint = save(run, snapshot(run, state))
        raise TrainingInterrupted(signal.Signals(run.stop_signal).name, state.step, checkpoint)


def training_step(run: Run, state: TrainState, step: int, log: RunLog) -> tuple[dict, list[dict] | None]:
    """Phases 1-4 of one optimizer step: its metrics, and its generation batch's completions when the step
    logs them. A generation batch serves ``num_steps_per_rollout`` steps (``steps_per_generation /
    gradient_accumulation_steps`` slices, ``num_iterations`` passes); each step trains on its slice of it."""
    cfg, sizes = run.cfg, run.cfg.sizes
    start, timings, device = time.perf_counter(), {}, run.accelerator.device
    position = (step - 1) % sizes.num_steps_per_rollout
    logged: dict[str, float] = {}  # reward functions' log_metric values
    if position == 0:
        state.rollout = make_rollout(run, step, timings, logged)
    rollout = state.rollout
    part = position % sizes.num_steps_per_generation
    rows_per_step = sizes.num_completions_per_generation // sizes.num_steps_per_generation
    learning_rate = run.scheduler.get_last_lr()[0]  # the rate this step's update uses
    with timed(timings, "update", device):  # phase 4
        update = policy_update(run, rollout, part * rows_per_step, (part + 1) * rows_per_step)
    if update["skipped"]:
        run.counters["num_nonfinite_steps"] += 1
        run.counters["consecutive_nonfinite_steps"] += 1
        logger.warning("step %d: %s; the update was skipped", step, update["skipped_reason"])
        if run.counters["consecutive_nonfinite_steps"] >= cfg.max_nonfinite_steps:
            raise NonFiniteTrainingError(f"{cfg.max_nonfinite_steps} consecutive steps with a non-finite loss, "
                                         "gradient or updated weights (max_nonfinite_steps); the weights are those of "
                                         "the last good step")
    else:
        run.counters["consecutive_nonfinite_steps"] = 0
    state.step = step
    if position == sizes.num_steps_per_rollout - 1:
        state.rollout = None  # used up: the next step samples a new batch
    samples, update = across_processes(run, rollout, update)
    metrics = step_metrics(step, samples, cfg.num_generations, run.sources, update, time.perf_counter() - start,
                           learning_rate)
    if not run.aux_loss_coef:
        metrics.pop("aux_loss")
    metrics.update(timings)
    metrics.update(reduce_logged(run, logged))
    names = ("num_truncated_prompts", "num_reward_errors")
    counts = torch.tensor([run.counters[name] for name in names], device=run.accelerator.device)
    if run.accelerator.num_processes > 1:  # each process counts its own prompts and samples
        counts = run.accelerator.reduce(counts, "sum")
    metrics.update(dict(zip(names, counts.tolist())))
    metrics["num_nonfinite_steps"] = run.counters["num_nonfinite_steps"]  # a step is skipped by all processes
    rows = None
    if log.wants_completions(step, step - position):
        rows = completion_rows(run, rollout, samples, step)
    return metrics, rows


def make_rollout(run: Run, step: int, timings: dict, logged: dict) -> Rollout:
    """Phases 1-3 for a new generation batch, under the run's compute dtype: sample, score, reference
    log-probs; and, when the batch is not trained on whole and at once (``upfront``), the sampling
    policy's log-probs and the advantages over the whole batch."""
    cfg, sizes, device = run.cfg, run.cfg.sizes, run.accelerator.device
    rows = next(run.sampler)
    with run.autocast():
        with timed(timings, "generate", device):  # phase 1
            rollout = sample_rollout(run, rows, step)
        with timed(timings, "score", device):  # phase 2
            logged.update(score_rollout(run, rollout, step))
        if run.reference is not None:  # phase 3
            with timed(timings, "reference", device):
                add_logprobs(rollout, run.reference, cfg.temperature, sizes.num_prompts_per_pass, "ref_logprobs_BT",
                             cfg.share_prompt_prefix)
        elif cfg.beta > 0 and has_adapters(run.policy):  # LoRA: the reference is the base model, adapters off
            with timed(timings, "reference", device), adapters_off(run.policy) as base:
                add_logprobs(rollout, base, cfg.temperature, sizes.num_prompts_per_pass, "ref_logprobs_BT",
                             cfg.share_prompt_prefix)
        advantages, old_logprobs = upfront(cfg, sizes)
        if old_logprobs:
            with timed(timings, "old_policy", device):
                add_logprobs(rollout, run.policy, cfg.temperature, sizes.num_prompts_per_pass, "old_logprobs_BT",
                             cfg.share_prompt_prefix)
    if advantages:
        add_advantages(rollout, rollout.old_logprobs_BT, cfg.beta, cfg.kl_estimator)
        if cfg.normalize_advantages:
            rollout.advantages_B = normalize_over_processes(run, rollout.advantages_B)
    return rollout


def upfront(cfg: RLOOConfig, sizes) -> tuple[bool, bool]:
    """Whether a generation batch needs its advantages and its sampling policy's log-probs before the update.

    Not when each micro-batch holds whole prompt groups and the batch makes one optimizer step once
    (the paper's on-policy REINFORCE): the training forward's detached log-probs are the sampling
    policy's, and each group's advantages come from its own micro-batch. Otherwise the advantages are
    taken over the whole batch first (leave-one-out needs every sibling, normalisation every sample),
    with the sampling policy's log-probs for the KL and for the ratio of rows trained after an update."""
    reused = cfg.num_iterations > 1 or sizes.num_steps_per_generation > 1
    split_groups = sizes.num_completions_per_micro_batch % cfg.num_generations != 0
    advantages = reused or split_groups or cfg.normalize_advantages
    return advantages, reused or (advantages and cfg.beta > 0)


def score_rollout(run: Run, rollout: Rollout, step: int) -> dict[str, float]:
    """Phase 2 with TRL's extra arguments (``trainer_state``, ``log_metric``, ``log_extra``); a reward function
    that raises on one process stops every process. Returns the mean of each ``log_metric`` name."""
    cfg = run.cfg
    errors: list[str] = []
    failure = None
    logged: dict[str, list[float]] = {}
    shared = {"trainer_state": trainer_state(run, step),
              "log_metric": lambda name, value: logged.setdefault(str(name), []).append(float(value)),
              "log_extra": lambda column, values: None}  # accepted (TRL's signature); not recorded yet
    try:
        score(rollout, run.sources, cfg.missing_eos_penalty, cfg.reward_errors, errors, shared)
    except RewardFunctionError as err:
        failure = err
    raise_on_every_process(run.accelerator, failure, lambda: RewardFunctionError(
        "a reward function raised on another process (its message is there)"))
    for line in errors:
        logger.warning("step %d: %s", step, line)
    run.counters["num_reward_errors"] += len(errors)
    return {name: sum(values) / len(values) for name, values in logged.items()}


def reduce_logged(run: Run, logged: dict[str, float]) -> dict[str, float]:
    """The values reward functions gave ``log_metric`` at this step, averaged over processes."""
    if run.accelerator.num_processes > 1:
        parts = [None] * run.accelerator.num_processes
        torch.distributed.all_gather_object(parts, logged)
        names = sorted({name for part in parts for name in part})
        logged = {name: sum(p[name] for p in parts if name in p) / sum(name in p for p in parts) for name in names}
    return {name if name not in RESERVED_METRICS else f"log_metric/{name}": value for name, value in logged.items()}


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


@contextmanager
def stop_on_signals(run: Run):
    """SIGINT / SIGTERM set ``run.stop_signal``: the loop finishes the step, saves and stops. A second
    SIGINT stops at once (KeyboardInterrupt, no checkpoint)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if run.stop_signal is not None and signum == signal.SIGINT:
            newest = committed_checkpoints(run.output_dir)
            where = (f"the newest checkpoint is {newest[-1]} (--resume_from_checkpoint latest)" if newest
                     else "no checkpoint was written before it")
            raise StopNow(f"a second Ctrl-C: stopped at once, without a checkpoint of the step in progress; {where}")
        run.stop_signal = signum
        logger.warning("%s received: finishing this step, then writing a checkpoint (Ctrl-C again: stop now)",
                       signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


RESERVED_METRICS = {"step", "reward", "reward_std", "kl", "entropy", "loss", "grad_norm", "learning_rate"}


def sample_rollout(run: Run, rows: list[int], step: int) -> Rollout:
    """Phase 1 for one batch of prompt rows: render, tokenize (left-truncate), sample k each."""
    sync_generator(run)
    prompts, columns = gather_rows(run.train_dataset, rows)
    texts = [render_prompt(p, run.tokenizer, run.cfg.chat_template_kwargs) for p in prompts]
    tokenized = tokenize_prompts(texts, run.tokenizer, run.prompt_limit, warn=False)
    if tokenized.num_truncated and run.counters["num_truncated_prompts"] == 0:
        logger.warning("prompts longer than %d tokens (max_prompt_length, or the model's context minus "
                       "max_completion_length) are left-truncated: their end, with the question, is kept; the "
                       "running count is the metric num_truncated_prompts", run.prompt_limit)
    run.counters["num_truncated_prompts"] += tokenized.num_truncated
    failure, rollout = None, None
    try:
        with gathered_for_generation(run.accelerator, run.accelerator.unwrap_model(run.policy),
                                     run.cfg.ds3_gather_for_generation):
            rollout = sample(run.generator, run.tokenizer, texts, tokenized.input_ids, columns,
                             run.cfg.num_generations, run.accelerator.device, prompt_seeds(run.cfg.seed, step, rows),
                             raw_prompts=prompts)
    except GenerationServerError as err:
        failure = err
    raise_on_every_process(run.accelerator, failure, lambda: GenerationServerError(
        "the generation server failed on another process (its message is there)"))
    return rollout

"""``train(cfg)``: set up once, then the RLOO loop as numbered phases.

    1 sample   k completions per prompt (generation backend)
    2 score    reward sources -> weighted score (rollout.score)
    3 ref      reference log-probs, only when beta > 0
    4 update   advantages + clipped policy gradient over micro-batches (objective.py)
    5 log      metrics.jsonl, progress bar
    6 save     checkpoints, final model folder with its model card
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from rloo import objective
from rloo.checkpoint import (COMMIT_MARKER, REFERENCE, TrainState, capture_rng, checkpoints_dir,
                             committed_checkpoints, load_weights, optimizer_state, rank_state, read_checkpoint,
                             remove_checkpoint, resolve_resume_path, restore_rng, rollout_fields, save_checkpoint,
                             save_reference)
from rloo.config import RLOOConfig, load_config, validate
from rloo.distributed import (checkpointable, full_state_dict, gathered_for_generation, lockstep, prepare_frozen,
                              setup_strategy)
from rloo.data import PromptSampler, gather_rows, load_prompt_dataset, render_prompt, tokenize_prompts
from rloo.evaluate import evaluate, paired_gain
from rloo.generation import Generator, build_generator, prompt_seeds
from rloo.metrics import MetricsWriter, step_metrics, timed
from rloo.models import (completion_logprobs, disable_dropout, eos_token_ids, frozen_copy, load_policy,
                         load_tokenizer, prompt_token_limit, resolve_model_path)
from rloo.errors import (CheckpointError, GenerationServerError, NonFiniteTrainingError, RewardFunctionError,
                         TrainingInterrupted)
from rloo.rewards import RewardSources, build_rewards
from rloo.rewards.model import RewardModel
from rloo.rollout import Rollout, add_advantages, add_logprobs, sample, score
from rloo.run_folder import save_run_folder

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything the loop needs, built once by ``setup``."""

    cfg: RLOOConfig
    accelerator: Accelerator
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    tokenizer: Any
    generator: Generator
    sources: RewardSources
    train_dataset: Any
    eval_dataset: Any
    sampler: PromptSampler
    optimizer: torch.optim.Optimizer
    scheduler: Any
    output_dir: Path
    start_model: str
    counters: dict = field(default_factory=lambda: dict.fromkeys(
        ("num_truncated_prompts", "num_reward_errors", "num_nonfinite_steps", "consecutive_nonfinite_steps"), 0))
    stop_signal: int | None = None  # set by SIGINT / SIGTERM
    prompt_limit: int | None = None  # max_prompt_length, lowered to fit the model's context (models.prompt_token_limit)
    generator_stale: bool = False  # the policy changed since the generator last took its weights


def sync_generator(run: Run) -> None:
    """Give the generator the policy's weights if they changed since it last took them (a vLLM engine;
    nothing for the transformers backend). Called before generating, so that a failed push (an
    unreachable server) happens before the step changes anything, and only once per generation batch."""
    if run.generator_stale:
        run.generator.load_weights(run.accelerator.unwrap_model(run.policy))
        run.generator_stale = False


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
    rewards: Sequence[str | Callable] | None = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
) -> TrainResult:
    """Fine-tune a causal LM with RLOO. ``model``, ``rewards`` and the datasets override the config's
    names; ``rewards`` may hold callables ``fn(prompts, completions, **columns) -> list[float | None]``.

    Checkpoints every ``save_steps`` (checkpoint.py); ``resume_from_checkpoint`` continues a run
    bit-identically. SIGINT / SIGTERM finish the step, write a checkpoint and raise TrainingInterrupted;
    a reward function that raises, or ``max_nonfinite_steps`` skipped steps in a row, write a checkpoint
    of the state before the failing step and raise."""
    cfg = copy.deepcopy(config) if config is not None else load_config()
    run = setup(cfg, model, tokenizer, rewards, train_dataset, eval_dataset)
    try:
        with stop_on_signals(run):
            return _train(run)
    finally:
        run.generator.close()  # a vLLM engine's processes


def _train(run: Run) -> TrainResult:
    cfg, sizes = run.cfg, run.cfg.sizes
    if cfg.resume_from_checkpoint:
        state = resume(run)
    else:
        state = TrainState(eval_before=run_evaluation(run, "before"))
        stop_if_asked(run, state)
    writer = MetricsWriter(run.output_dir / "metrics.jsonl", enabled=run.accelerator.is_main_process,
                           keep_through_step=state.step if cfg.resume_from_checkpoint else None)
    history = list(writer.kept)
    progress = tqdm(total=sizes.max_steps, initial=state.step, desc="rloo",
                    disable=cfg.disable_tqdm or not run.accelerator.is_main_process)
    try:
        for step in range(state.step + 1, sizes.max_steps + 1):
            before = snapshot(run, state)  # where this step starts: saved if the step fails
            try:
                metrics = training_step(run, state, step)
            except (RewardFunctionError, NonFiniteTrainingError, GenerationServerError) as err:
                where = save(run, before)
                raise type(err)(f"step {step}: {err}; the state before this step is saved in {where}") from err
            history.append(metrics)  # phase 5
            if step % cfg.logging_steps == 0 or step == sizes.max_steps:
                writer.write(metrics)
                if progress.disable and run.accelerator.is_main_process:  # no bar: one line per logged step
                    print(f"step {step}/{sizes.max_steps} reward {_fmt(metrics['reward'])} kl {_fmt(metrics['kl'])} "
                          f"episodes/s {metrics['episodes_per_s']:.1f}", flush=True)
            progress.set_postfix(reward=_fmt(metrics["reward"], 3), kl=_fmt(metrics["kl"], 3),
                                 eps=f"{metrics['episodes_per_s']:.1f}")
            progress.update(1)
            if cfg.save_steps and step % cfg.save_steps == 0:
                save(run, snapshot(run, state))
            stop_if_asked(run, state)
    finally:
        progress.close()
        writer.close()
    eval_after = run_evaluation(run, "after")
    stop_if_asked(run, state)  # a signal during the last evaluation: resuming redoes only the evaluation
    summary = summarize(state.eval_before, eval_after)
    weights = full_state_dict(run.accelerator, run.policy)  # gathered from the shards by every process
    if run.accelerator.is_main_process:  # phase 6
        save_run_folder(run, summary, weights)
    run.accelerator.wait_for_everyone()  # the run folder is complete when train() returns, on every process
    return TrainResult(run.output_dir, state.eval_before, eval_after, history, cfg)


def stop_if_asked(run: Run, state: TrainState) -> None:
    """After SIGINT / SIGTERM (on any process: all stop together): a checkpoint of the state now, then
    TrainingInterrupted."""
    if run.accelerator.num_processes > 1:
        flag = torch.tensor([run.stop_signal or 0], device=run.accelerator.device)
        run.stop_signal = int(run.accelerator.reduce(flag, "max").item()) or None
    if run.stop_signal is not None:
        checkpoint = save(run, snapshot(run, state))
        raise TrainingInterrupted(signal.Signals(run.stop_signal).name, state.step, checkpoint)


def training_step(run: Run, state: TrainState, step: int) -> dict:
    """Phases 1-4 of one optimizer step; the generation batch is made every num_iterations steps."""
    cfg, sizes = run.cfg, run.cfg.sizes
    start, timings = time.perf_counter(), {}
    if (step - 1) % cfg.num_iterations == 0:
        rows = next(run.sampler)
        with timed(timings, "generate"):  # phase 1
            rollout = sample_rollout(run, rows, step)
        with timed(timings, "score"):  # phase 2
            errors: list[str] = []
            failure = None
            try:
                score(rollout, run.sources, cfg.missing_eos_penalty, cfg.reward_errors, errors)
            except RewardFunctionError as err:
                failure = err
            if run.accelerator.num_processes > 1:  # one process's failure stops them all (no one left waiting)
                flag = torch.tensor([failure is not None], dtype=torch.int32, device=run.accelerator.device)
                if run.accelerator.reduce(flag, "max").item() and failure is None:
                    failure = RewardFunctionError("a reward function raised on another process (its message is there)")
            if failure is not None:
                raise failure
            for line in errors:
                logger.warning("step %d: %s", step, line)
            run.counters["num_reward_errors"] += len(errors)
        if run.reference is not None:  # phase 3
            with timed(timings, "reference"):
                add_logprobs(rollout, run.reference, cfg.temperature, sizes.num_prompts_per_micro_batch,
                             "ref_logprobs_BT", cfg.share_prompt_prefix)
        if cfg.num_iterations > 1 or cfg.normalize_advantages:
            # The batch is reused or normalised as a whole: its sampling-policy log-probs are needed up front.
            with timed(timings, "old_policy"):
                add_logprobs(rollout, run.policy, cfg.temperature, sizes.num_prompts_per_micro_batch,
                             "old_logprobs_BT", cfg.share_prompt_prefix)
            add_advantages(rollout, rollout.old_logprobs_BT, cfg.beta, cfg.kl_estimator)
            if cfg.normalize_advantages:
                rollout.advantages_B = normalize_over_processes(run, rollout.advantages_B)
        state.rollout = rollout
    rollout = state.rollout
    learning_rate = run.scheduler.get_last_lr()[0]  # the rate this step's update uses
    with timed(timings, "update"):  # phase 4
        update = policy_update(run, rollout)
    if update["skipped"]:
        run.counters["num_nonfinite_steps"] += 1
        run.counters["consecutive_nonfinite_steps"] += 1
        logger.warning("step %d: non-finite loss or gradient norm; the update was skipped", step)
        if run.counters["consecutive_nonfinite_steps"] >= cfg.max_nonfinite_steps:
            raise NonFiniteTrainingError(f"{cfg.max_nonfinite_steps} consecutive steps with a non-finite loss or "
                                         "gradient (max_nonfinite_steps); the weights are those of the last good step")
    else:
        run.counters["consecutive_nonfinite_steps"] = 0
    state.step = step
    if step % cfg.num_iterations == 0:
        state.rollout = None  # used up: the next step samples a new batch
    samples, update = across_processes(run, rollout, update)
    metrics = step_metrics(step, samples, cfg.num_generations, run.sources, update, time.perf_counter() - start,
                           learning_rate)
    metrics.update(timings)
    names = ("num_truncated_prompts", "num_reward_errors")
    counts = torch.tensor([run.counters[name] for name in names], device=run.accelerator.device)
    if run.accelerator.num_processes > 1:  # each process counts its own prompts and samples
        counts = run.accelerator.reduce(counts, "sum")
    metrics.update(dict(zip(names, counts.tolist())))
    metrics["num_nonfinite_steps"] = run.counters["num_nonfinite_steps"]  # a step is skipped by all processes
    return metrics


def normalize_over_processes(run: Run, advantages_B: torch.Tensor) -> torch.Tensor:
    """objective.normalize_advantages over the step's whole batch (every process), this process's part."""
    if run.accelerator.num_processes == 1:
        return objective.normalize_advantages(advantages_B)
    everything_B = objective.normalize_advantages(run.accelerator.gather(advantages_B.contiguous()))
    return everything_B.view(run.accelerator.num_processes, -1)[run.accelerator.process_index]


def across_processes(run: Run, rollout: Rollout, update: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The step's per-completion tensors from every process (gathered, rank order) and its update
    figures reduced over processes (loss and clip ratio averaged: each process's loss is its share)."""
    samples = {
        "scores_B": rollout.scores_B, "rewards_BF": rollout.rewards_BF, "kl_B": rollout.kl_B,
        "lengths_B": rollout.completion_mask_BT.sum(1), "truncated_B": rollout.truncated_B,
        "advantages_B": update["advantages_B"], "logprob_gap_sum_B": update["logprob_gap_sum_B"],
    }
    if run.accelerator.num_processes == 1:
        return samples, update
    gather = run.accelerator.gather
    samples = {name: gather(tensor.contiguous()) for name, tensor in samples.items()}
    device = run.accelerator.device
    totals = gather(torch.tensor([[update["loss"], update["clip_ratio"], update["entropy_sum"], update["num_tokens"]]],
                                 dtype=torch.float64, device=device))
    update = dict(update, loss=totals[:, 0].mean().item(), clip_ratio=totals[:, 1].mean().item(),
                  entropy=(totals[:, 2].sum() / totals[:, 3].sum().clamp(min=1)).item())
    return samples, update


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------- checkpoints
def snapshot(run: Run, state: TrainState) -> TrainState:
    """The loop's state now (RNG, data position, counters, buffered batch): what a checkpoint holds."""
    return TrainState(step=state.step, sampler=run.sampler.state_dict(), counters=dict(run.counters),
                      rollout=state.rollout, eval_before=state.eval_before, rng=capture_rng(),
                      scheduler=copy.deepcopy(run.scheduler.state_dict()))


def save(run: Run, state: TrainState) -> Path | None:
    """A committed checkpoint of ``state`` (every process's, gathered) with the current weights and
    optimizer; written by the main process while the others wait. None (and a warning) under FSDP /
    DeepSpeed, whose optimizer state is sharded (distributed.checkpointable)."""
    if not checkpointable(run.accelerator):
        logger.warning("no checkpoint at step %d: FSDP / DeepSpeed shard the optimizer state, which rloo's "
                       "checkpoints do not hold", state.step)
        return None
    states = [state]
    if run.accelerator.num_processes > 1:
        states = [None] * run.accelerator.num_processes
        torch.distributed.all_gather_object(states, _to_cpu(state))  # in memory; files hold no pickle
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
    if run.accelerator.num_processes > 1:  # everyone learns whether process 0's save worked (and waits for it)
        flag = torch.tensor([error is not None], dtype=torch.int32, device=run.accelerator.device)
        if run.accelerator.reduce(flag, "max").item() and error is None:
            error = CheckpointError("process 0 could not write the checkpoint (its message is there)")
    if error is not None:
        raise error
    return path if path is not None else checkpoints_dir(run.output_dir) / f"step-{state.step:06d}"


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
        "num_processes": cfg.sizes.num_processes, "architecture": architecture,
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:16],
    }


def resume(run: Run) -> TrainState:
    """Load a checkpoint into the run: weights, reference, optimizer, scheduler, data position, RNG."""
    cfg = run.cfg
    path = resolve_resume_path(cfg.resume_from_checkpoint, run.output_dir)
    meta, tensors = read_checkpoint(path)
    now = fingerprint(run)
    saved = meta.get("fingerprint", {})
    differences = [f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in now if saved.get(key) != now[key]]
    if differences and not cfg.resume_ignore_mismatch:
        raise CheckpointError(f"cannot resume from {path}: this run differs from it in {'; '.join(differences)} "
                              "(set resume_ignore_mismatch true to resume anyway)")
    kept = [f"{key} {meta['config'].get(key)!r}" for key in ("learning_rate", "lr_scheduler_type", "warmup_ratio",
            "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon") if meta["config"].get(key) != getattr(cfg, key)]
    if kept:
        logger.warning("resuming keeps the checkpoint's optimizer and schedule: %s (the values given now are not used)",
                       ", ".join(kept))
    load_weights(run.accelerator.unwrap_model(run.policy), path)
    if run.reference is not None:
        reference = path.parent / REFERENCE
        if not (reference / COMMIT_MARKER).is_file():
            raise CheckpointError(f"cannot resume from {path}: beta > 0 but {reference} holds no committed reference")
        load_weights(run.reference, reference)
    run.optimizer.load_state_dict(optimizer_state(meta["optimizer"], tensors["optimizer"]))
    run.scheduler.load_state_dict(meta["scheduler"])
    run.sampler.load_state_dict(meta["sampler"])
    rank = run.accelerator.process_index
    if rank >= len(meta["ranks"]):
        raise CheckpointError(f"cannot resume from {path}: written by {len(meta['ranks'])} processes, this is process "
                              f"{rank}")
    counters, rng, rollout_parts = rank_state(meta, tensors, rank)
    run.counters.update(counters)
    restore_rng(rng)
    rollout = None
    if rollout_parts is not None:
        rollout = Rollout(**rollout_fields(*rollout_parts, run.accelerator.device))
    if path.parent == checkpoints_dir(run.output_dir) and run.accelerator.is_main_process:
        for newer in committed_checkpoints(run.output_dir):  # past this one: the abandoned branch
            if int(newer.name.split("-")[1]) > meta["step"]:
                logger.warning("removing %s: the run continues from the earlier %s", newer, path.name)
                remove_checkpoint(newer)
    run.generator_stale = True  # a vLLM engine gets the checkpoint's weights before it next generates
    run.accelerator.wait_for_everyone()
    logger.info("resumed from %s (step %d)", path, meta["step"])
    return TrainState(step=meta["step"], rollout=rollout, eval_before=meta["eval_before"])


@contextmanager
def stop_on_signals(run: Run):
    """SIGINT / SIGTERM set ``run.stop_signal``: the loop finishes the step, saves and stops. A second
    SIGINT stops at once (KeyboardInterrupt, no checkpoint)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if run.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.stop_signal = signum
        logger.warning("%s received: finishing this step, then writing a checkpoint (Ctrl-C again: stop now)",
                       signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def setup(cfg: RLOOConfig, model, tokenizer, rewards, train_dataset, eval_dataset) -> Run:
    """Validate, then load data, policy, reference, rewards and the optimizer (cheap checks first)."""
    if rewards is not None:
        cfg.reward_funcs = [r if isinstance(r, str) else f"{r.__module__}:{getattr(r, '__qualname__', r)}" for r in rewards]
    if cfg.resume_from_checkpoint not in (None, "latest") and cfg.output_dir is None:
        cfg.output_dir = str(Path(cfg.resume_from_checkpoint).parent.parent)  # <run>/checkpoints/step-N
    validate(cfg)  # config errors before any data or model is touched
    # cpu=True without CUDA: then torchrun / `accelerate launch --multi_gpu` processes form a gloo group.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    setup_strategy(accelerator, cfg)  # DDP, FSDP2 or DeepSpeed, from the accelerate config (distributed.py)
    train_dataset, eval_dataset = load_datasets(cfg, train_dataset, eval_dataset)
    sizes = cfg.resolve(accelerator.num_processes, len(train_dataset))
    policy, tokenizer, start_model = load_model(cfg, model, tokenizer)
    set_seed(cfg.seed)  # after loading: a first run that builds the tiny policy samples like every later run
    sources = load_rewards(cfg, rewards, tokenizer)  # a reward model is placed after the policy (prepare_frozen)
    reference = frozen_copy(policy) if cfg.beta > 0 else None  # copied before the policy is sharded
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    # transformers' "constant" ignores warm-up; its "constant_with_warmup" is what a warm-up ratio asks for.
    schedule = "constant_with_warmup" if cfg.lr_scheduler_type == "constant" else cfg.lr_scheduler_type
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * sizes.max_steps),
                              num_training_steps=sizes.max_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    policy.train()
    if reference is not None:  # sharded like the policy under FSDP / ZeRO-3, else a whole copy on the device
        reference = prepare_frozen(accelerator, reference)
    for fn in sources.fns:
        if isinstance(fn, RewardModel):
            fn.model, fn.device = prepare_frozen(accelerator, fn.model), accelerator.device
    unwrapped = accelerator.unwrap_model(policy)
    sampler = PromptSampler(len(train_dataset), sizes.num_prompts_per_process, cfg.seed,
                            accelerator.process_index, accelerator.num_processes, cfg.shuffle_dataset)
    output_dir = Path(cfg.output_dir or f"runs/{cfg.preset or 'rloo'}-{datetime.now():%Y%m%d-%H%M%S}")
    cfg.output_dir = str(output_dir)
    if not cfg.resume_from_checkpoint and committed_checkpoints(output_dir):
        raise ValueError(f"output_dir '{output_dir}' holds checkpoints of an earlier run: continue it with "
                         "--resume_from_checkpoint latest, or choose another output_dir")
    # Last: a vLLM engine (its processes) or server connection, once every check has passed.
    generator = build_generator(cfg, unwrapped, tokenizer, eos_token_ids(unwrapped, tokenizer),
                                all_done=lockstep(accelerator, cfg.ds3_gather_for_generation))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return Run(cfg, accelerator, policy, reference, tokenizer, generator, sources, train_dataset, eval_dataset,
               sampler, optimizer, scheduler, output_dir, start_model,
               prompt_limit=prompt_token_limit(unwrapped, cfg.max_prompt_length, cfg.max_completion_length))


def load_rewards(cfg: RLOOConfig, rewards, tokenizer) -> RewardSources:
    """The run's reward sources; a reward model scores the policy's token ids when it shares the
    policy's vocabulary, each prompt once per group when ``share_prompt_prefix`` (RewardModel)."""
    return build_rewards(rewards if rewards is not None else cfg.reward_funcs, cfg.reward_weights,
                         cfg.reward_model_name_or_path, device="cpu",
                         reward_model_kwargs={"append_eos": cfg.reward_model_append_eos, "policy_tokenizer": tokenizer,
                                              "share_prompt": cfg.share_prompt_prefix})


def load_datasets(cfg: RLOOConfig, train_dataset, eval_dataset) -> tuple[Any, Any]:
    """Training prompts and held-out prompts: the given eval_dataset, else the eval split of dataset_name
    when training on it (a single file or a dataset object has no held-out split of its own)."""
    if train_dataset is not None:
        train = load_prompt_dataset(train_dataset, cfg.dataset_train_split)
        cfg.dataset_name = f"in-memory dataset ({len(train)} rows)" if not isinstance(train_dataset, str) else train_dataset
    else:
        train = load_prompt_dataset(cfg.dataset_name, cfg.dataset_train_split)
    if eval_dataset is not None:
        return train, load_prompt_dataset(eval_dataset, cfg.dataset_eval_split)
    if cfg.num_eval_samples == 0 or train_dataset is not None or Path(cfg.dataset_name).is_file():
        return train, None
    try:
        return train, load_prompt_dataset(cfg.dataset_name, cfg.dataset_eval_split)
    except ValueError as err:
        if "split" not in str(err).lower():
            raise
        logger.warning("no held-out evaluation: dataset '%s' has no split '%s' (%s)", cfg.dataset_name,
                       cfg.dataset_eval_split, err)
        return train, None


def load_model(cfg: RLOOConfig, model, tokenizer) -> tuple[torch.nn.Module, Any, str]:
    """The policy (a name, or a model object), its tokenizer (with a pad token), dropout off."""
    if model is None or isinstance(model, str):
        start_model = resolve_model_path(model or cfg.model_name_or_path)
        policy = load_policy(start_model, cfg.torch_dtype, cfg.trust_remote_code)
    else:
        policy, start_model = model, getattr(model, "name_or_path", "") or "in-memory model"
    cfg.model_name_or_path = start_model
    if tokenizer is None:
        tokenizer = load_tokenizer(start_model, cfg.trust_remote_code)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        policy.config.use_cache = False
    return policy, tokenizer, start_model


def sample_rollout(run: Run, rows: list[int], step: int) -> Rollout:
    """Phase 1 for one batch of prompt rows: render, tokenize (left-truncate), sample k each."""
    sync_generator(run)
    prompts, columns = gather_rows(run.train_dataset, rows)
    texts = [render_prompt(p, run.tokenizer) for p in prompts]
    tokenized = tokenize_prompts(texts, run.tokenizer, run.prompt_limit, warn=False)
    if tokenized.num_truncated and run.counters["num_truncated_prompts"] == 0:
        logger.warning("prompts longer than %d tokens (max_prompt_length, or the model's context minus "
                       "max_completion_length) are left-truncated: their end, with the question, is kept; the "
                       "running count is the metric num_truncated_prompts", run.prompt_limit)
    run.counters["num_truncated_prompts"] += tokenized.num_truncated
    with gathered_for_generation(run.accelerator, run.accelerator.unwrap_model(run.policy),
                                 run.cfg.ds3_gather_for_generation):
        return sample(run.generator, run.tokenizer, texts, tokenized.input_ids, columns, run.cfg.num_generations,
                      run.accelerator.device, prompt_seeds(run.cfg.seed, step, rows))


def policy_update(run: Run, rollout: Rollout) -> dict[str, float]:
    """Phase 4: one optimizer step over the rollout in micro-batches of whole prompt groups.

    The loss divides by the step's total sequence count, so accumulating micro-batches equals one
    big batch. When the batch is used once, the training forward doubles as the old-policy pass
    (old = detached current log-probs, ratio = 1), so no extra forward is spent on it. A non-finite
    loss or gradient norm skips the optimizer step (``skipped``).
    """
    cfg, sizes = run.cfg, run.cfg.sizes
    num_sequences = rollout.completion_ids_BT.shape[0]
    totals = {"loss": 0.0, "clip_ratio": 0.0, "entropy": 0.0, "num_tokens": 0.0}
    kl_B, advantages_B, gap_B = [], [], []
    micro_batches = list(rollout.micro_batches(sizes.num_prompts_per_micro_batch))
    for index, mb in enumerate(micro_batches):
        # Across processes, gradients are averaged once, after the step's last micro-batch (DDP no_sync).
        last = index == len(micro_batches) - 1
        run.accelerator.sync_gradients = last  # DeepSpeed steps its optimizer in the backward that syncs
        with contextlib.nullcontext() if last else run.accelerator.no_sync(run.policy):
            loss, entropy_BT, loss_metrics = micro_batch_loss(run, mb, num_sequences)
            run.accelerator.backward(loss)
        mb_size = mb.completion_ids_BT.shape[0]
        totals["loss"] += loss.item()
        totals["clip_ratio"] += loss_metrics["clip_ratio"].item() * mb_size / num_sequences
        totals["entropy"] += entropy_BT.sum().item()
        totals["num_tokens"] += mb.completion_mask_BT.sum().item()
        kl_B.append(mb.kl_B if mb.kl_B is not None else torch.zeros(mb_size, device=mb.scores_B.device))
        advantages_B.append(mb.advantages_B)
        gap_B.append(loss_metrics.get("logprob_gap_sum_B", torch.full((mb_size,), math.nan, device=mb.scores_B.device)))
    grad_norm = run.accelerator.clip_grad_norm_(run.policy.parameters(), cfg.max_grad_norm or math.inf)
    grad_norm = math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed: its norm (None before a step)
    # A non-finite loss or gradient would poison the weights and Adam's moments: skip the update (counted).
    # (Under DeepSpeed the update already happened inside the last backward: only counted.)
    skipped = not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm))
    if run.accelerator.num_processes > 1:  # every process skips, or none does
        flag = torch.tensor([skipped], dtype=torch.int32, device=run.accelerator.device)
        skipped = bool(run.accelerator.reduce(flag, "max").item())
    if not skipped:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.generator_stale = True
    if rollout.kl_B is None:
        rollout.kl_B = torch.cat(kl_B).detach()
    return {
        "loss": totals["loss"],
        "clip_ratio": totals["clip_ratio"],
        "entropy": totals["entropy"] / max(totals["num_tokens"], 1.0),
        "entropy_sum": totals["entropy"],
        "num_tokens": totals["num_tokens"],
        "grad_norm": grad_norm if not skipped else None,
        "skipped": skipped,
        "advantages_B": torch.cat(advantages_B).detach(),
        "logprob_gap_sum_B": torch.cat(gap_B),
    }


def micro_batch_loss(run: Run, mb: Rollout, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The training forward of one micro-batch, its advantages when not computed up front, and its
    share of the step's loss (divided by the step's ``num_sequences``)."""
    cfg = run.cfg
    logprobs_BT, entropy_BT = completion_logprobs(run.policy, mb.prompt_ids_PL, mb.prompt_mask_PL,
                                                  mb.completion_ids_BT, mb.completion_mask_BT, cfg.temperature,
                                                  with_entropy=True, share_prompt=cfg.share_prompt_prefix)
    old_logprobs_BT = mb.old_logprobs_BT if mb.old_logprobs_BT is not None else logprobs_BT.detach()
    if mb.advantages_B is None:
        add_advantages(mb, old_logprobs_BT, cfg.beta, cfg.kl_estimator)
    loss_mask_BT = mb.completion_mask_BT
    if cfg.mask_truncated_completions:
        loss_mask_BT = loss_mask_BT * (~mb.truncated_B).long()[:, None]
    loss, loss_metrics = objective.policy_loss(
        logprobs_BT, old_logprobs_BT, mb.advantages_B, loss_mask_BT, num_sequences,
        cfg.epsilon, cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon,
    )
    if mb.sampler_logprobs_BT is not None:  # vLLM's log-probs against the training model's, per completion
        gap_BT = (mb.sampler_logprobs_BT - old_logprobs_BT).abs() * mb.completion_mask_BT
        loss_metrics["logprob_gap_sum_B"] = gap_BT.sum(1).detach()
    return loss, entropy_BT, loss_metrics


def run_evaluation(run: Run, when: str) -> dict | None:
    if run.eval_dataset is None or run.cfg.num_eval_samples == 0:
        return None
    sync_generator(run)
    policy = run.accelerator.unwrap_model(run.policy)
    result = evaluate(policy, run.tokenizer, run.eval_dataset, run.sources, run.cfg, run.cfg.num_eval_samples,
                      accelerator=run.accelerator, generator=run.generator)
    policy.train()
    if run.accelerator.is_main_process:
        logger.info("held-out reward %s training: %.4f", when, result["reward_mean"])
    return result


def summarize(before: dict | None, after: dict | None) -> dict | None:
    """The before/after held-out comparison printed at the end of a run and written to eval.json."""
    if before is None or after is None:
        return None
    gain = paired_gain(before, after)
    return {
        "reward_before": before["reward_mean"],
        "reward_after": after["reward_mean"],
        "gain": gain["gain"],
        "gain_se": gain["se"],
        "gain_z": gain["z"],
        "gain_relative": gain["relative"],
        "num_prompts": after["num_prompts"],
        "before": {k: v for k, v in before.items() if not k.startswith("per_prompt")},
        "after": {k: v for k, v in after.items() if not k.startswith("per_prompt")},
    }

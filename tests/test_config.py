"""Tests for rloo.config (presets, validation, coercion, derived sizes, YAML) and the config part of the CLI."""

import argparse

import pytest
import yaml

from rloo.config import RLOOConfig, load_config, preset_names

# Every config field, in schema order. The same names are the `rloo train` options and the YAML keys,
# so renaming or removing one breaks users' scripts: change this list only on purpose (torchtitan's
# frozen CLI test).
FIELD_NAMES = [
    # model
    "model_name_or_path", "torch_dtype", "model_init_kwargs", "attn_implementation", "model_revision",
    "trust_remote_code", "disable_dropout", "router_aux_loss_coef", "use_peft", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "lora_modules_to_save", "lora_task_type", "load_in_4bit", "load_in_8bit",
    "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage", "merge_adapter",
    # data
    "dataset_name", "dataset_config", "dataset_train_split", "dataset_eval_split", "shuffle_dataset",
    "max_prompt_length", "chat_template_kwargs", "remove_unused_columns", "num_eval_samples",
    # generation
    "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "generation_kwargs", "generation_batch_size", "steps_per_generation", "share_prompt_prefix",
    "ds3_gather_for_generation", "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
    "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
    # reward
    "reward_funcs", "reward_weights", "reward_model_name_or_path", "reward_model_append_eos", "missing_eos_penalty",
    # objective
    "beta", "kl_estimator", "epsilon", "epsilon_high", "normalize_advantages", "mask_truncated_completions",
    "num_iterations",
    # training
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "optim",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_steps", "num_train_epochs", "seed", "bf16", "fp16", "pure_low_precision",
    "gradient_checkpointing", "gradient_checkpointing_kwargs",
    # run
    "output_dir", "overwrite_output_dir", "logging_steps", "disable_tqdm", "save_steps", "save_strategy", "save_total_limit", "resume_from_checkpoint",
    "resume_ignore_mismatch", "reward_errors", "reward_timeout", "undo_nonfinite_updates", "max_nonfinite_steps",
    "preset",
    # report
    "report_to", "run_name", "project", "trackio_space_id", "log_completions", "num_completions_to_print",
    "eval_strategy", "eval_steps", "eval_on_start", "push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy",
    "hub_token", "hub_revision",
]


def valid_config(**overrides) -> RLOOConfig:
    """A config that resolves without data: one reward function and a fixed number of steps."""
    return RLOOConfig(**{"reward_funcs": ["rouge_l"], "max_steps": 10, **overrides})


def train_subparser() -> argparse.ArgumentParser:
    from rloo.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["train"]


# ------------------------------------------------------------------------------------------ presets


def test_preset_names():
    assert {"tldr-tiny", "tldr-pythia-1b"} <= set(preset_names())


@pytest.mark.parametrize("name", ["tldr-tiny", "tldr-pythia-1b"])
def test_presets_load_and_resolve(name):
    cfg = load_config(name)
    sizes = cfg.resolve(num_train_rows=116722)
    assert cfg.preset == name
    assert sizes.max_steps >= 1
    assert cfg.sizes is sizes


def test_pythia_preset_holds_the_rloo_tldr_recipe():
    cfg = load_config("tldr-pythia-1b")
    assert cfg.model_name_or_path == "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"
    assert cfg.reward_model_name_or_path == "cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr"
    assert cfg.reward_funcs == []
    assert cfg.dataset_name == "trl-lib/tldr"
    assert cfg.num_generations == 2
    assert cfg.learning_rate == pytest.approx(3e-6) and isinstance(cfg.learning_rate, float)
    assert cfg.beta == pytest.approx(0.03)
    assert cfg.missing_eos_penalty == 1.0
    assert cfg.temperature == pytest.approx(0.7)
    assert cfg.max_completion_length == 53
    assert cfg.max_prompt_length == 512
    assert cfg.bf16 is True and cfg.torch_dtype == "bfloat16" and cfg.pure_low_precision is False  # mixed precision
    # 16 completions per micro-batch = 8 prompts x k=2; x 4 accumulation steps = 32 prompts per step and generation.
    sizes = cfg.resolve(num_train_rows=116722)
    assert sizes.num_completions_per_micro_batch == 16
    assert sizes.num_prompts_per_generation == 32 and sizes.num_completions_per_generation == 64
    assert sizes.num_steps_per_generation == sizes.num_steps_per_rollout == 1
    assert sizes.num_completions_per_step == 64
    assert sizes.max_steps == 116722 // 32  # one epoch


def test_tiny_preset_is_the_cpu_default():
    cfg = load_config()
    assert cfg.preset == "tldr-tiny"
    assert cfg.model_name_or_path == "rloo:tldr-tiny-sft"
    assert cfg.dataset_name == "rloo:tldr"
    assert cfg.reward_weights is None and len(cfg.reward_funcs) == 4  # weights default to 1.0 each
    assert cfg.resolve(num_train_rows=1000).max_steps == 80  # fixed in the preset, not derived


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_generations": 1}, "num_generations"),
        ({"num_generations": 4, "per_device_train_batch_size": 6}, "per_device_train_batch_size"),
        ({"report_to": ["comet_ml"]}, "report_to"),
        ({"eval_strategy": "epoch"}, "eval_strategy"),
        ({"eval_steps": 2.5}, "eval_steps"),
        ({"hub_strategy": "all_checkpoints"}, "hub_strategy"),
        ({"optim": "adamw_8bit"}, "optim"),
        ({"warmup_steps": 10, "warmup_ratio": 0.1}, "warmup_steps"),
        ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "lr_scheduler_type"),
        ({"bf16": True, "fp16": True}, "bf16"),
        ({"generation_kwargs": {"num_beams": 4}}, "generation_kwargs"),
        ({"min_p": 1.5}, "min_p"),
        ({"reward_weights": [1.0, 2.0]}, "reward_weights"),
        ({"reward_model_name_or_path": "some/rm", "reward_weights": [1.0]}, "reward_weights"),
        ({"beta": -0.01}, "beta"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"kl_estimator": "k2"}, "kl_estimator"),
        ({"reward_funcs": []}, "reward_funcs"),
    ],
)
def test_validation_errors_are_one_line_naming_the_field(overrides, field):
    cfg = valid_config(**overrides)
    with pytest.raises(ValueError) as info:
        cfg.resolve()
    message = str(info.value)
    assert field in message
    assert "\n" not in message


def test_reward_model_alone_is_a_reward_source():
    cfg = valid_config(reward_funcs=[], reward_model_name_or_path="some/rm", reward_weights=[0.5])
    assert cfg.resolve().max_steps == 10


def test_unknown_field_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        RLOOConfig(learnign_rate=1)
    with pytest.raises(AttributeError, match="learnign_rate"):
        RLOOConfig().learnign_rate


def test_flat_names_read_and_write_through_sections():
    cfg = RLOOConfig(learning_rate=2e-5, training={"seed": 7})
    assert cfg.training.learning_rate == cfg.learning_rate == 2e-5
    assert cfg.seed == 7
    cfg.beta = 0.5
    assert cfg.objective.beta == 0.5


# ------------------------------------------------------------------------------------------ coercion


def test_coercion_from_strings():
    cfg = RLOOConfig(
        learning_rate="3e-6",
        num_generations="2",
        max_steps=5.0,
        gradient_checkpointing="true",
        trust_remote_code="False",
        output_dir="none",
        missing_eos_penalty="None",
        max_prompt_length="null",
        reward_model_name_or_path="none",
        reward_funcs="rouge_l",
        reward_weights=["1", "0.5"],
    )
    assert cfg.learning_rate == 3e-6 and isinstance(cfg.learning_rate, float)
    assert cfg.num_generations == 2 and isinstance(cfg.num_generations, int)
    assert cfg.max_steps == 5 and isinstance(cfg.max_steps, int)
    assert cfg.gradient_checkpointing is True
    assert cfg.trust_remote_code is False
    assert cfg.output_dir is None
    assert cfg.missing_eos_penalty is None
    assert cfg.max_prompt_length is None
    assert cfg.reward_model_name_or_path is None
    assert cfg.reward_funcs == ["rouge_l"]
    assert cfg.reward_weights == [1.0, 0.5]
    cfg.reward_funcs = ("rouge_l", "grounding")
    cfg.reward_weights = "2"
    assert cfg.reward_funcs == ["rouge_l", "grounding"]
    assert cfg.reward_weights == [2.0]
    cfg.reward_weights = "none"
    assert cfg.reward_weights is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", "fast"),
        ("num_generations", "four"),
        ("num_generations", 2.5),
        ("num_generations", "none"),  # not optional
        ("gradient_checkpointing", "maybe"),
        ("reward_weights", ["1", "heavy"]),
        ("temperature", None),
    ],
)
def test_bad_value_error_names_the_field(field, value):
    with pytest.raises(ValueError) as info:
        RLOOConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field}:")
    assert "\n" not in message


# ------------------------------------------------------------------------------------------ frozen CLI


def test_field_names_are_frozen():
    assert list(RLOOConfig().to_dict()) == FIELD_NAMES
    assert len(set(FIELD_NAMES)) == len(FIELD_NAMES)


def test_train_options_are_the_config_fields():
    train = train_subparser()
    options = {s for action in train._actions for s in action.option_strings} - {"-h", "--help"}
    assert options == {"--config", "--dtype", "--dataset_test_split"} | {f"--{name}" for name in FIELD_NAMES}
    helps = {a.option_strings[0]: a.help for a in train._actions if a.option_strings}
    assert all(helps[f"--{name}"] and not helps[f"--{name}"].startswith(" (default") for name in FIELD_NAMES)


def test_train_options_become_config_values():
    from rloo.cli import overrides_from

    args = train_subparser().parse_args(
        ["--config", "tldr-tiny", "--learning_rate", "3e-6", "--reward_funcs", "rouge_l", "grounding",
         "--reward_weights", "1", "0.5", "--gradient_checkpointing", "true"]
    )
    cfg = load_config(args.config, overrides_from(args))
    assert cfg.learning_rate == 3e-6
    assert cfg.reward_funcs == ["rouge_l", "grounding"]
    assert cfg.reward_weights == [1.0, 0.5]
    assert cfg.gradient_checkpointing is True
    assert cfg.num_generations == 4  # untouched options keep the preset's value


def test_cli_unknown_option_exits_2_naming_the_field(capsys):
    from rloo.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--learnign_rate", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "learnign_rate" in err and "learning_rate" in err


# ------------------------------------------------------------------------------------------ sizes


def test_sizes_from_batch_size_k_and_accumulation():
    cfg = valid_config(per_device_train_batch_size=8, num_generations=4, gradient_accumulation_steps=2)
    sizes = cfg.resolve()
    assert sizes.num_completions_per_micro_batch == 8
    assert sizes.num_prompts_per_generation == 4 and sizes.num_completions_per_generation == 16
    assert sizes.num_completions_per_step == 16
    assert sizes.num_steps_per_generation == 1 and sizes.num_prompts_per_pass == 2
    assert sizes.max_steps == 10
    sizes = cfg.resolve(num_processes=2)
    assert sizes.num_prompts_per_generation == 4  # per process
    assert sizes.num_completions_per_step == 32


@pytest.mark.parametrize(
    "overrides, per_generation, steps_per_generation",
    [
        ({"steps_per_generation": 4}, 8, 4),  # TRL's steps_per_generation: 4 micro-batches of 2, 4 optimizer steps
        ({"generation_batch_size": 8}, 8, 4),  # the same batch named by its size (TRL's generation_batch_size)
        ({"gradient_accumulation_steps": 2, "steps_per_generation": 4}, 8, 2),
        ({}, 2, 1),  # default: one generation per optimizer step
    ],
)
def test_generation_batch_is_decoupled_from_the_micro_batch(overrides, per_generation, steps_per_generation):
    # k = 4 and 2 completions per micro-batch: a micro-batch holds half a prompt group (TRL allows it).
    cfg = valid_config(per_device_train_batch_size=2, num_generations=2, **overrides)
    sizes = cfg.resolve()
    assert sizes.num_completions_per_generation == per_generation
    assert sizes.num_steps_per_generation == steps_per_generation
    half = valid_config(per_device_train_batch_size=2, num_generations=4, steps_per_generation=2).resolve()
    assert half.num_completions_per_generation == 4 and half.num_prompts_per_generation == 1


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"generation_batch_size": 8, "steps_per_generation": 2}, "steps_per_generation"),
        ({"generation_batch_size": 6, "per_device_train_batch_size": 4}, "generation_batch_size"),
        ({"per_device_train_batch_size": 2, "num_generations": 4}, "num_generations"),
        ({"steps_per_generation": 3, "gradient_accumulation_steps": 2, "num_generations": 2}, "steps_per_generation"),
    ],
)
def test_generation_batch_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        valid_config(**overrides).resolve()


@pytest.mark.parametrize("num_train_epochs, num_train_rows, max_steps", [(1, 100, 25), (2, 100, 50), (1.5, 10, 3), (1, 7, 1)])
def test_max_steps_derived_from_epochs_and_rows(num_train_epochs, num_train_rows, max_steps):
    # 4 prompts per step; a partial last step is dropped (steps per epoch = rows // 4).
    cfg = valid_config(per_device_train_batch_size=8, num_generations=4, gradient_accumulation_steps=2,
                       max_steps=-1, num_train_epochs=num_train_epochs)
    assert cfg.resolve(num_train_rows=num_train_rows).max_steps == max_steps


def test_max_steps_needs_rows_or_a_value():
    cfg = valid_config(max_steps=-1)
    with pytest.raises(ValueError, match="max_steps"):
        cfg.resolve()
    with pytest.raises(ValueError, match="prompts"):
        valid_config(max_steps=-1, per_device_train_batch_size=8, num_generations=4).resolve(num_train_rows=1)


# ------------------------------------------------------------------------------------------ YAML


def test_load_config_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    # `3e-6` without a dot is a string to PyYAML (YAML 1.1); coercion makes it a float.
    path.write_text("learning_rate: 3e-6\nnum_generations: 2\nreward_funcs: [rouge_l]\ntraining:\n  seed: 3\n")
    cfg = load_config(str(path), {"beta": "0.1", "num_generations": 8})
    assert cfg.learning_rate == 3e-6 and isinstance(cfg.learning_rate, float)
    assert cfg.reward_funcs == ["rouge_l"]
    assert cfg.seed == 3
    assert cfg.beta == 0.1
    assert cfg.num_generations == 8  # overrides win over the file
    assert cfg.preset is None
    assert cfg.temperature == RLOOConfig().temperature  # the rest keeps the schema defaults


def test_load_config_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1.0e-5\nnum_generation: 2\n")
    with pytest.raises(ValueError, match="num_generation'.*did you mean 'num_generations'"):
        load_config(str(path))


def test_load_config_unknown_name():
    with pytest.raises(ValueError, match="no-such-preset"):
        load_config("no-such-preset")


@pytest.mark.parametrize("name", ["tldr-tiny", "tldr-pythia-1b"])
def test_to_dict_round_trips_through_yaml(tmp_path, name):
    cfg = load_config(name, {"reward_weights": None, "epsilon_high": 0.3, "output_dir": "runs/x"})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    again = load_config(str(path))
    assert again.to_dict() == cfg.to_dict()
    assert {k: type(v) for k, v in again.to_dict().items()} == {k: type(v) for k, v in cfg.to_dict().items()}
    assert again.preset == name


def test_bare_boolean_flag_means_true_and_preset_accepts_fewer_reward_funcs():
    from rloo.cli import build_parser

    args = build_parser().parse_args(["train", "--gradient_checkpointing", "--normalize_advantages", "false"])
    cfg = load_config(None, {k: v for k, v in vars(args).items() if k not in ("command", "config")})
    assert cfg.gradient_checkpointing is True and cfg.normalize_advantages is False
    # the preset names no weights, so choosing other reward functions needs no weights either
    cfg = load_config("tldr-tiny", {"reward_funcs": ["rouge_l"]})
    assert cfg.resolve().num_prompts_per_generation == 4


def test_trl_python_and_yaml_forms_are_read_as_data(tmp_path):
    """A torch.dtype in model_init_kwargs (TRL's Python form) is kept by name, so checkpoints and config.yaml can
    hold it; an unquoted YAML `no` (a boolean to YAML 1.1) is the text field's "no"."""
    import json

    import torch

    cfg = valid_config(model_init_kwargs={"dtype": torch.bfloat16, "attn_implementation": "sdpa"})
    cfg.resolve()
    assert cfg.model_init_kwargs == {"dtype": "bfloat16", "attn_implementation": "sdpa"} and cfg.torch_dtype == "bfloat16"
    json.dumps(cfg.to_dict())
    with pytest.raises(ValueError, match="^model_init_kwargs: its values must be plain data"):
        valid_config(model_init_kwargs={"device_map": object()})
    path = tmp_path / "trl.yaml"
    path.write_text("eval_strategy: no\nsave_strategy: no\nreward_funcs: [rouge_l]\nmax_steps: 3\n")
    cfg = load_config(str(path))
    cfg.resolve()
    assert cfg.eval_strategy == "no" and cfg.save_steps == 0 and cfg.origins["save_steps"] == "save_strategy"


@pytest.mark.parametrize("key", ["per_device_eval_batch_size", "use_liger_kernel"])
def test_common_trl_fields_rloo_lacks_are_refused_with_what_to_do(key):
    with pytest.raises(ValueError, match=f"^config field '{key}': "):
        RLOOConfig(**{key: 1})


def test_gradient_checkpointing_kwargs_take_json_and_refuse_reentrant_checkpointing():
    cfg = valid_config(gradient_checkpointing_kwargs='{"preserve_rng_state": false}')  # as the command line gives it
    assert cfg.gradient_checkpointing_kwargs == {"preserve_rng_state": False} and cfg.gradient_checkpointing is True
    cfg.resolve()
    with pytest.raises(ValueError, match="^gradient_checkpointing_kwargs: use_reentrant true is not supported"):
        valid_config(gradient_checkpointing_kwargs={"use_reentrant": True}).resolve()

"""``rloo train | sft | reward-model | eval | generate | vllm-serve | report``: options are config field names, as TRL users type them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

from rloo.config import ALIASES, SECTIONS, load_config, preset_names, unknown_key_message
from rloo.errors import RlooError, TrainingInterrupted, one_line

logger = logging.getLogger("rloo")


def add_config_options(parser: argparse.ArgumentParser, sections: dict[str, type] | None = None) -> None:
    """One ``--field`` per config field (of ``sections``: rloo train's by default), grouped by section, help from
    the field's help text."""
    parser.add_argument("--config", default=None,
                        help=f"Preset name ({', '.join(preset_names())}) or a YAML file; default tldr-tiny." if sections
                        is None else "A YAML file of field: value; default: the library defaults (TRL's).")
    for section, cls in (sections or SECTIONS).items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            kind = str(f.type)
            # Lists take several values (none: `--reward_funcs` alone empties it); a bare boolean flag means true
            # (`--gradient_checkpointing`), as in TRL.
            nargs, const = ("*", None) if kind.startswith("list") else ("?", "true") if kind.startswith("bool") else (None, None)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            aliases = [f"--{alias}" for alias, name in ALIASES.items() if name == f.name]  # TRL's other names
            group.add_argument(f"--{f.name}", *aliases, dest=f.name, nargs=nargs, const=const, default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=f"{f.metadata.get('help', '')} (default: {default})")


def parse_known_strict(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Unknown options are errors naming the option (with the closest field name)."""
    args, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("--"):
            parser.error(unknown_key_message(token[2:].split("=")[0]))
        parser.error(f"unexpected argument {token!r}")
    return args


def overrides_from(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("config", "command", *skip)}


def train_config(args: argparse.Namespace):
    """The preset or YAML with the options on top; resuming without --config starts from the
    checkpoint's own resolved config instead."""
    overrides = overrides_from(args)
    if overrides.get("resume_from_checkpoint") is None or args.config is not None:
        return load_config(args.config, overrides, origin="flag")
    from rloo.config import RLOOConfig

    return resumed_config(overrides, RLOOConfig)


def cmd_sft(args: argparse.Namespace) -> int:
    from rloo.sft_stage import sft
    from rloo.sft_config import SFTConfig

    result = run_stage_command(args, SFTConfig, sft)
    if result is not None and result.eval_before and result.eval_after:
        print(f"held-out loss {result.eval_before['loss']:.4f} -> {result.eval_after['loss']:.4f} "
              f"({result.eval_after['num_rows']} rows)")
    return 0


def cmd_reward_model(args: argparse.Namespace) -> int:
    from rloo.reward_config import RewardConfig
    from rloo.reward_stage import reward_model

    result = run_stage_command(args, RewardConfig, reward_model)
    if result is not None and result.eval_after:
        after = result.eval_after
        before = f"{result.eval_before['accuracy']:.3f} -> " if result.eval_before else ""
        print(f"held-out accuracy {before}{after['accuracy']:.3f} (s.e. {after['accuracy_se']:.3f}, "
              f"{after['num_pairs']} pairs)")
    return 0


def run_stage_command(args: argparse.Namespace, config_class, runner):
    """A supervised stage from the command line: its config (a YAML file, the checkpoint's when resuming
    without one, the options on top), run; the result on the main process (None elsewhere)."""
    overrides = overrides_from(args)
    if overrides.get("resume_from_checkpoint") is not None and args.config is None:
        cfg = resumed_config(overrides, config_class)
    else:
        cfg = load_config(args.config, overrides, origin="flag", config_class=config_class)
    result = runner(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    print(f"run folder: {result.output_dir}")
    return result


def resumed_config(overrides: dict, config_class):
    """Resuming without --config: the checkpoint's own resolved config, the options on top."""
    from rloo.checkpoint import read_config, resolve_resume_path

    resume = overrides["resume_from_checkpoint"]
    if resume == "latest" and overrides.get("output_dir") is None:
        raise ValueError("resume_from_checkpoint=latest needs --output_dir (the run folder whose newest checkpoint "
                         "to continue)")
    path = resolve_resume_path(resume, overrides.get("output_dir") or "")
    saved = {key: value for key, value in read_config(path).items()
             if key not in ("output_dir", "resume_from_checkpoint", "resume_ignore_mismatch")}
    cfg = config_class().update(saved, "checkpoint")
    cfg.output_dir = str(path.parent.parent)  # the run folder the checkpoint is in (<run>/checkpoints/step-N)
    return cfg.update(overrides, "flag")


def cmd_train(args: argparse.Namespace) -> int:
    from rloo.trainer import train

    cfg = train_config(args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # one report per run, from the main process
        return 0
    print(f"run folder: {result.output_dir}")
    if result.eval_before and result.eval_after:
        before, after = result.eval_before, result.eval_after
        from rloo.held_out import paired_gain

        gain = paired_gain(before, after)
        print(f"held-out reward on {after['num_prompts']} {cfg.dataset_eval_split} prompts: "
              f"before {before['reward_mean']:.4f} -> after {after['reward_mean']:.4f} "
              f"({gain['gain']:+.4f} +/- {gain['se']:.4f} s.e., {100 * gain['relative']:+.1f}%)")
        for key in before:
            if key.startswith("rewards/"):
                print(f"  {key[8:]:<22} {before[key]:.4f} -> {after[key]:.4f}")
    return 0


def eval_config(model_dir: str, config: str | None, overrides: dict):
    """The run's own config.yaml when evaluating an ``rloo train`` run folder, else the named or default preset
    (an ``rloo sft`` or ``rloo reward-model`` folder's config.yaml holds that stage's fields)."""
    own = Path(model_dir) / "config.yaml"
    cfg = load_config(config if config or not is_train_run(own) else str(own), overrides, origin="flag")
    cfg.model_name_or_path = model_dir
    return cfg


def is_train_run(config_yaml: Path) -> bool:
    """Whether a folder's config.yaml is rloo train's: no field of another stage's config in it."""
    if not config_yaml.is_file():
        return False
    import yaml

    from rloo.config import RLOOConfig

    values = yaml.safe_load(config_yaml.read_text()) or {}
    from rloo.reward_config import RewardConfig
    from rloo.sft_config import SFTConfig

    known = set(RLOOConfig.SCHEMA.field_section)
    other = (set(SFTConfig.SCHEMA.field_section) | set(RewardConfig.SCHEMA.field_section)) - known
    return not (isinstance(values, dict) and other & set(values))


def cmd_eval(args: argparse.Namespace) -> int:
    import functools

    import torch

    from rloo.data import load_prompt_dataset
    from rloo.precision import LOW, mixed_precision_mode
    from rloo.held_out import evaluate
    from rloo.models import load_policy, load_tokenizer, resolve_model_path
    from rloo.run import load_rewards

    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1 (held-out prompts to score), got {args.num_samples}")
    if not 0 <= args.eval_seed < 2**32:
        raise ValueError(f"--eval_seed must be in 0..2**32-1, got {args.eval_seed}")
    from rloo.judge import JUDGE_OPTIONS
    from rloo.judge_run import cmd_judge

    overrides = overrides_from(args, ("model", "dataset", "num_samples", "eval_seed", *JUDGE_OPTIONS))
    cfg = eval_config(resolve_model_path(args.model), args.config, overrides)
    if args.judge is not None or args.judge_url is not None:
        return cmd_judge(args, cfg)
    cfg.use_vllm = False  # rloo eval samples with the transformers backend (no engine or server to start)
    cfg.resolve(num_train_rows=1 << 30)
    if args.dataset is None and cfg.dataset_name is None:
        raise ValueError("--dataset: name the held-out prompts (this model's config names no dataset_name)")
    if args.dataset is None and Path(cfg.dataset_name).is_file():
        raise ValueError(f"--dataset: dataset_name '{cfg.dataset_name}' is one file with no held-out split; "
                         "name the held-out prompts with --dataset")
    dataset = load_prompt_dataset(args.dataset or cfg.dataset_name, cfg.dataset_eval_split)
    # As trained: float32 weights (the master copy the run folder holds) unless pure_low_precision.
    model = load_policy(cfg.model_name_or_path, cfg.torch_dtype if cfg.pure_low_precision else "float32",
                        cfg.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    sources = load_rewards(cfg, None, tokenizer)
    mode = mixed_precision_mode(cfg, torch.cuda.is_available())  # compute as the run trained (--bf16)
    autocast = None if mode == "no" else functools.partial(torch.autocast, "cpu" if not torch.cuda.is_available()
                                                           else "cuda", dtype=LOW[mode])
    result = evaluate(model, tokenizer, dataset, sources, cfg, args.num_samples or cfg.num_eval_samples or None,
                      seed=args.eval_seed, autocast=autocast)
    from rloo.run_folder import strict_json

    print(json.dumps(strict_json({k: v for k, v in result.items() if not k.startswith("per_prompt")}), allow_nan=False))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from rloo.data import render_prompt, tokenize_prompts
    from rloo.generation.hf import HFGenerator
    from rloo.models import eos_token_ids, load_policy, load_tokenizer, resolve_model_path

    for option, ok, expected in (("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
                                 ("num_generations", args.num_generations >= 1, ">= 1"),
                                 ("temperature", math.isfinite(args.temperature) and args.temperature >= 0,
                                  ">= 0 (0 = greedy)"),
                                 ("seed", 0 <= args.seed < 2**32, "in 0..2**32-1")):
        if not ok:
            raise ValueError(f"--{option} must be {expected}, got {getattr(args, option)}")
    path = resolve_model_path(args.model)
    model = load_policy(path, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(path, args.trust_remote_code)
    torch.manual_seed(args.seed)
    generator = HFGenerator(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos_token_ids(model, tokenizer),
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            do_sample=args.temperature > 0)
    for prompt in args.prompts:
        text = render_prompt(prompt, tokenizer)
        ids = tokenize_prompts([text], tokenizer, None).input_ids
        out = generator.generate(ids, args.num_generations)
        for row, mask in zip(out.completion_ids_BT, out.completion_mask_BT):
            print(tokenizer.decode(row[mask.bool()], skip_special_tokens=True).strip())
            print("---")
    return 0


def cmd_vllm_serve(args: argparse.Namespace) -> int:
    import torch

    from rloo.generation.vllm import require_vllm
    from rloo.models import resolve_model_path

    require_vllm("serve")  # one line, before FastAPI / uvicorn are imported
    from rloo.generation.vllm_server import serve

    serve(resolve_model_path(args.model), args.host, args.port, api_key=args.api_key,
          tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
          gpu_memory_utilization=args.gpu_memory_utilization or (0.9 if torch.cuda.is_available() else 0.3),
          dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rloo.report import write_report

    run_dir = Path(args.run_dir)
    problem = ("not a folder" if not run_dir.is_dir() else
               "no metrics.jsonl in it (not an rloo run folder)" if not (run_dir / "metrics.jsonl").is_file() else None)
    if problem:  # exit 2, as for a bad command line: the folder named is not a run
        print(f"rloo report: error: {run_dir}: {problem}", file=sys.stderr)
        return 2
    write_report(run_dir)
    print(run_dir / "report.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rloo", description="Fine-tune causal LMs with RLOO (REINFORCE Leave-One-Out).")
    commands = parser.add_subparsers(dest="command")
    train = commands.add_parser("train", help="Train with RLOO (default preset: tldr-tiny).", allow_abbrev=False)
    add_config_options(train)
    from rloo.sft_config import SFT_SECTIONS

    supervised = commands.add_parser("sft", help="Supervised fine-tuning on prompt/completion, messages or text rows "
                                     "(TRL's SFTConfig fields).", allow_abbrev=False)
    add_config_options(supervised, SFT_SECTIONS)
    from rloo.reward_config import REWARD_SECTIONS

    rewarding = commands.add_parser("reward-model", help="Train a Bradley-Terry reward model on {prompt, chosen, "
                                    "rejected} pairs (TRL's RewardConfig fields).", allow_abbrev=False)
    add_config_options(rewarding, REWARD_SECTIONS)
    evaluate = commands.add_parser("eval", help="Score a model's completions on held-out prompts, or judge them against references or a second model (--judge, --judge_url).", allow_abbrev=False)
    evaluate.add_argument("--model", required=True, help="Model folder (a run folder or any causal LM) or hub id.")
    evaluate.add_argument("--dataset", default=None, help="Prompt dataset (default: the config's dataset_name).")
    evaluate.add_argument("--num_samples", type=int, default=None, help="Held-out prompts to score (default: num_eval_samples).")
    evaluate.add_argument("--eval_seed", type=int, default=1234, help="Sampling seed (the one train uses for its before/after evaluation).")
    from rloo.judge import add_judge_options

    add_judge_options(evaluate)
    add_config_options(evaluate)
    generate = commands.add_parser("generate", help="Print completions of a model for prompts.", allow_abbrev=False)
    generate.add_argument("--model", required=True, help="Model folder or hub id.")
    generate.add_argument("prompts", nargs="+", help="Prompt texts.")
    generate.add_argument("--num_generations", type=int, default=1, help="Completions per prompt.")
    generate.add_argument("--max_new_tokens", type=int, default=53, help="Maximum new tokens.")
    generate.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (0 = greedy).")
    generate.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    generate.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the hub to run.")
    serve = commands.add_parser("vllm-serve", help="Serve generation with vLLM for `rloo train --use_vllm true "
                                "--vllm_mode server` (weights pushed by the trainer).", allow_abbrev=False)
    serve.add_argument("--model", required=True, help="The policy to start from (folder, hub id or rloo:tldr-tiny-sft).")
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on; any but loopback (127.0.0.1, ::1, "
                       "localhost) needs an API key.")
    serve.add_argument("--api_key", default=None, help="Shared secret every request must carry (Authorization: Bearer "
                       "KEY; rloo train sends RLOO_VLLM_API_KEY); default: the RLOO_VLLM_API_KEY environment variable, "
                       "which is better (a command line is visible to other users).")
    serve.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    serve.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs per engine.")
    serve.add_argument("--data_parallel_size", type=int, default=1, help="Engines; each request's prompts are split over them.")
    serve.add_argument("--gpu_memory_utilization", type=float, default=None,
                       help="Share of each GPU's memory an engine reserves (on a CPU: of its NUMA node's memory); "
                       "default 0.9 on a GPU, 0.3 on a CPU.")
    serve.add_argument("--dtype", default="auto", help="Weights dtype (float32, bfloat16, float16); auto: the "
                       "model's own (its config.json), as the trainer holds it.")
    serve.add_argument("--max_model_len", type=int, default=None, help="Longest prompt + completion (default: the model's).")
    serve.add_argument("--seed", type=int, default=0, help="Engine seed (requests carry their own).")
    report = commands.add_parser("report", help="Write RUN_DIR/report.html (plots, samples, config) for a run folder.",
                                 allow_abbrev=False)
    report.add_argument("run_dir", metavar="RUN_DIR", help="The run folder (with metrics.jsonl).")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # `rloo` alone runs the default preset
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parse_known_strict(parser, argv)
    handlers = {"train": cmd_train, "sft": cmd_sft, "reward-model": cmd_reward_model, "eval": cmd_eval, "generate": cmd_generate, "vllm-serve": cmd_vllm_serve,
                "report": cmd_report}
    try:
        return handlers[args.command](args)
    except TrainingInterrupted as err:
        print(f"rloo {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # a second Ctrl-C in training (StopNow), or one before training started
        if os.environ.get("RLOO_DEBUG"):
            raise
        print(f"rloo {args.command}: {str(err) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RlooError) as err:
        if os.environ.get("RLOO_DEBUG"):
            raise
        print(f"rloo {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - still one line; the traceback is for RLOO_DEBUG=1
        if os.environ.get("RLOO_DEBUG"):
            raise
        print(f"rloo {args.command}: error: {type(err).__name__}: {one_line(err)} (unexpected: RLOO_DEBUG=1 shows "
              "where; please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

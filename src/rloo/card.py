"""The model card (README.md of the run folder): what the model is, how to load it, how it was trained and
how to train it again, its results and plots, and where its tracker run is. It names the model the user gave
(a hub id, or rloo's built-in policy), never a folder of this machine."""

from __future__ import annotations

import platform
import shlex
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from rloo.hub import is_local

RLOO_BIBTEX = """@inproceedings{ahmadian2024back,
    title     = {{Back to Basics: Revisiting REINFORCE-Style Optimization for Learning from Human Feedback in LLMs}},
    author    = {Arash Ahmadian and Chris Cremer and Matthias Gall{\\'{e}} and Marzieh Fadaee and Julia Kreutzer and Olivier Pietquin and Ahmet {\\"{U}}st{\\"{u}}n and Sara Hooker},
    year      = 2024,
    booktitle = {Proceedings of the 62nd Annual Meeting of the Association for Computational Linguistics (Volume 1: Long Papers), {ACL} 2024},
    pages     = {12248--12267},
}"""

TLDR_BIBTEX = """@inproceedings{stiennon2020learning,
    title     = {Learning to summarize from human feedback},
    author    = {Nisan Stiennon and Long Ouyang and Jeff Wu and Daniel M. Ziegler and Ryan Lowe and Chelsea Voss and Alec Radford and Dario Amodei and Paul Christiano},
    year      = 2020,
    booktitle = {Advances in Neural Information Processing Systems 33 (NeurIPS 2020)},
}

@inproceedings{volske2017tldr,
    title     = {{TL;DR}: Mining {R}eddit to Learn Automatic Summarization},
    author    = {Michael V{\\"o}lske and Martin Potthast and Shahbaz Syed and Benno Stein},
    year      = 2017,
    booktitle = {Proceedings of the Workshop on New Frontiers in Summarization},
    pages     = {59--63},
}"""


def package_versions() -> dict[str, str]:
    names = ["rloo", "transformers", "torch", "accelerate", "datasets", "tokenizers", "safetensors"]
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def quick_start(model_path: str, example_prompt, has_chat_template: bool, max_new_tokens: int) -> str:
    """A snippet that runs as written on this folder (tested): TL;DR text, or chat messages if templated."""
    if has_chat_template and isinstance(example_prompt, list):
        prompt = repr(example_prompt)
    elif has_chat_template:
        prompt = repr([{"role": "user", "content": example_prompt}])
    else:
        prompt = repr(example_prompt if isinstance(example_prompt, str) else example_prompt[-1]["content"])
    return (
        "from transformers import pipeline\n\n"
        f"generator = pipeline(\"text-generation\", model={model_path!r})\n"
        f"prompt = {prompt}\n"
        f"output = generator(prompt, max_new_tokens={max_new_tokens}, return_full_text=False)[0]\n"
        "print(output[\"generated_text\"])\n"
    )


BUILTIN_MODELS = {"rloo:tldr-tiny-sft": "rloo's built-in tldr-tiny policy (a tiny pythia-architecture model, supervised "
                                        "on the bundled TL;DR sample with rloo sft)",
                  "rloo:tldr-tiny-base": "rloo's built-in tldr-tiny base (a tiny pythia-architecture model at random "
                                         "init, with a BPE tokenizer trained on the bundled TL;DR sample)"}
# Not in the command that trains the model again: where it was written, how it continued, and secrets.
NOT_REPRODUCED = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_ignore_mismatch", "hub_token",
                  "preset", "disable_tqdm")
CARD_PLOTS = ("plots/reward.png", "plots/kl.png", "plots/completion_length.png", "plots/eval_reward.png")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` (the policy as the user gave it) is a Hub repository id."""
    return model_label(name)[1] is not None


def model_label(name: str) -> tuple[str, str | None]:
    """How the card names the starting policy, and its hub id (for ``base_model``) when it has one."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name], None
    if is_local(name):
        return f"a local model (`{Path(name).name}`)", None
    if name.startswith("rloo:") or not name or " " in name:
        return f"`{name}`", None
    return f"[`{name}`](https://huggingface.co/{name})", name


def reproduce_command(cfg, model_name: str, out: Path, command: str = "train") -> str:
    """``rloo <command>`` with the preset and every field whose value differs from it (from the library
    defaults without one); local paths by their folder's name, since they exist only on this machine."""
    from rloo.config import RLOOConfig, load_config, preset_names

    preset = cfg.preset if command == "train" and cfg.preset in preset_names() else None
    base = (load_config(preset) if preset else RLOOConfig() if command == "train" else type(cfg)()).to_dict()
    parts = ["rloo", command, *(["--config", preset] if preset else [])]
    values = dict(cfg.to_dict(), model_name_or_path=model_name)
    for name, value in values.items():
        if name in NOT_REPRODUCED or value == base.get(name):
            continue
        items = value if isinstance(value, list) else [value]
        shown = [Path(v).name if isinstance(v, str) and "/" in v and is_local(v) else v for v in items]
        parts += [f"--{name}", *(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in shown)]
    parts += ["--output_dir", out.name]
    return " ".join(shlex.quote(part) for part in parts)


def model_card(cfg, model_name: str, sources, summary: dict | None, example_prompt, tokenizer, out: Path,
               hub_repo: str | None = None, plots: list[str] = (), tracker_links: dict[str, str] | None = None,
               metrics: list[dict] = (), adapter: str | None = None) -> str:
    """``adapter``: "adapter" when the folder is a LoRA adapter, "merged" when it holds the merged model."""
    label, base = model_label(model_name)
    dataset = cfg.dataset_name if not cfg.dataset_name.startswith("rloo:") else "trl-lib/tldr"
    front = {"library_name": "transformers", "tags": ["rloo", "reinforcement-learning", "text-generation"],
             "datasets": [dataset]}
    if adapter == "adapter":
        front["library_name"] = "peft"  # the Hub's word for an adapter repository
    if base:
        front["base_model"] = base
    # the quick start loads the Hub repository; a folder-only run loads the folder from the directory holding it
    where = hub_repo or out.name
    snippet = quick_start(where, example_prompt, bool(tokenizer.chat_template), cfg.max_completion_length)
    rewards = ", ".join(f"`{n}` (weight {w:g})" for n, w in zip(sources.names, sources.weights))
    data_note = (
        "the real Reddit TL;DR sample bundled with rloo (1,445 training prompts in the `trl-lib/tldr` format, "
        "from OpenAI's *Learning to summarize from human feedback* release)"
        if cfg.dataset_name == "rloo:tldr" else f"`{cfg.dataset_name}` (split `{cfg.dataset_train_split}`)"
    )
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# Model card for {hub_repo.split('/')[-1] if hub_repo else out.name}", "",
        f"This model is a fine-tuned version of {label} on {data_note}. It has been trained with "
        "[rloo](https://pypi.org/project/rloo/), an implementation of RLOO (REINFORCE Leave-One-Out).", "",
        *(["It is a LoRA adapter (r = %s, alpha = %s): with peft installed (`pip install peft`), transformers loads "
           "it on its base model." % (cfg.lora_r, cfg.lora_alpha), ""] if adapter == "adapter" else []),
        *(["Its LoRA adapter (r = %s, alpha = %s) is merged into the weights, which load without peft; the adapter "
           "itself is in `adapter/`." % (cfg.lora_r, cfg.lora_alpha), ""] if adapter == "merged" else []),
        "## Quick start", "",
        *([] if hub_repo else ["Run it from the directory that holds the run folder (or upload the folder to the Hub "
                               "and name its repository):", ""]),
        "```python", snippet.rstrip(), "```", "",
        "## Training procedure", "",
    ]
    for tracker, url in (tracker_links or {}).items():  # as TRL's cards link their wandb run
        if tracker == "Weights & Biases":
            lines += [f'[<img src="https://raw.githubusercontent.com/wandb/assets/main/wandb-github-badge-28.svg" '
                      f'alt="Visualize in Weights & Biases" width="150" height="24"/>]({url})', ""]
        else:
            lines += [f"[Visualize in {tracker}]({url})", ""]
    lines += [
        "This model was trained with RLOO, a method introduced in *Back to Basics: Revisiting REINFORCE-Style "
        "Optimization for Learning from Human Feedback in LLMs* (Ahmadian et al., ACL 2024): for each prompt, "
        f"k = {cfg.num_generations} completions are sampled and each one's advantage is its reward minus the mean "
        "reward of its k - 1 siblings.", "",
        "Train it again with:", "", "```bash", reproduce_command(cfg, model_name, out), "```", "",
        "| hyperparameter | value |", "|---|---|",
        f"| reward sources | {rewards} |",
        *(f"| {name} | {getattr(cfg, name)} |" for name in (
            "reward_model_name_or_path", "num_generations", "learning_rate", "lr_scheduler_type", "beta",
            "kl_estimator", "missing_eos_penalty", "temperature", "max_prompt_length", "max_completion_length",
            "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_iterations", "seed")),
        f"| optimizer steps run | {cfg.sizes.max_steps} |", "",
        "The full resolved configuration is in `config.yaml`, the per-step metrics in `metrics.jsonl`, sampled "
        "completions in `completions.jsonl`, and every plot in `report.html`.", "",
    ]
    lines += results(cfg, summary, metrics)
    shown = [plot for plot in CARD_PLOTS if plot in plots]
    if shown:
        lines += ["## Plots", "", *(f"![{Path(p).stem}]({p})" for p in shown), ""]
    lines += ["## Framework versions", ""]
    lines += [f"- {name}: {v}" for name, v in package_versions().items()]
    lines += ["", "## Citations", "", "Cite RLOO as:", "", "```bibtex", RLOO_BIBTEX, "```", "",
              "The TL;DR data (Reddit posts and reference summaries; Webis-TLDR-17, CC BY 4.0):", "",
              "```bibtex", TLDR_BIBTEX, "```", ""]
    return "\n".join(lines)


def results(cfg, summary: dict | None, metrics: list[dict]) -> list[str]:
    """The results tables: held-out reward before / after, every periodic evaluation, the training figures of
    the first and the last logged step."""
    lines = []
    if summary is not None:
        after = summary["after"]
        lines += ["## Evaluation", "",
                  f"Held-out reward on {summary['num_prompts']} `{cfg.dataset_eval_split}` prompts (one sampled "
                  f"completion each, temperature {cfg.temperature}, same seed each time):", ""]
        keys = [k for k in after if k.startswith("rewards/") or k == "completion_length_mean"]
        if "before" in summary:
            before = summary["before"]
            lines += ["| | before | after |", "|---|---|---|",
                      f"| reward | {summary['reward_before']:.4f} | {summary['reward_after']:.4f} |",
                      *(f"| {k} | {before[k]:.4f} | {after[k]:.4f} |" for k in keys), "",
                      f"Paired gain: {summary['gain']:+.4f} (standard error {summary['gain_se']:.4f}).", ""]
        else:
            lines += ["| | after |", "|---|---|", f"| reward | {summary['reward_after']:.4f} |",
                      *(f"| {k} | {after[k]:.4f} |" for k in keys), ""]
    evals = [m for m in metrics if "eval/reward" in m]
    if len(evals) > 2:
        lines += ["Every evaluation of the run:", "", "| step | held-out reward |", "|---|---|",
                  *(f"| {m['step']} | {_num(m['eval/reward'])} |" for m in evals), ""]
    steps = [m for m in metrics if "reward" in m]
    if steps:
        first, last = steps[0], steps[-1]
        names = [k for k in ("reward", "kl", "completion_length", "entropy", "frac_truncated") if k in last]
        lines += ["## Training figures", "", f"| | step {first['step']} | step {last['step']} |", "|---|---|---|",
                  *(f"| {k} | {_num(first.get(k))} | {_num(last.get(k))} |" for k in names), ""]
    return lines


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


STAGE_HYPERPARAMETERS = ("learning_rate", "lr_scheduler_type", "max_length", "per_device_train_batch_size",
                         "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed")


def stage_card_parts(run, command: str, tldr: bool) -> tuple[list[str], list[str]]:
    """A supervised stage's card pieces (rloo sft, rloo reward-model): how to train it again with its
    hyperparameters, and the closing versions and citations."""
    cfg = run.cfg
    again = ["Train it again with:", "", "```bash", reproduce_command(cfg, run.model_name, run.output_dir, command),
             "```", "", "| hyperparameter | value |", "|---|---|",
             *(f"| {name} | {getattr(cfg, name)} |" for name in STAGE_HYPERPARAMETERS),
             f"| optimizer steps run | {cfg.sizes.max_steps} |", ""]
    tail = ["## Framework versions", "", *(f"- {name}: {v}" for name, v in package_versions().items()), ""]
    if tldr:
        tail += ["## Citations", "", "The TL;DR data (Reddit posts, reference summaries and human comparisons):", "",
                 "```bibtex", TLDR_BIBTEX, "```", ""]
    return again, tail

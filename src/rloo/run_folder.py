"""The run folder: a Hugging Face model folder plus what explains it (config, metrics, eval, model card)."""

from __future__ import annotations

import json
import math
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from rloo.final import write_final
from rloo.hub import is_local
from rloo.models import restored_config

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


def save_run_folder(run, summary: dict | None, state_dict: dict | None = None, checkpoint: Path | None = None) -> None:
    """Weights (safetensors), config, tokenizer, generation config, resolved YAML, eval.json, README.md,
    written whole or not at all (``write_final``). ``state_dict``: the policy's weights when gathered from
    shards (FSDP / ZeRO-3), else its own; ``checkpoint``: where the same weights are saved, named if the
    write fails."""
    cfg, out = run.cfg, run.output_dir
    model = run.accelerator.unwrap_model(run.policy)
    gen = model.generation_config
    gen.do_sample, gen.temperature, gen.max_new_tokens = True, cfg.temperature, cfg.max_completion_length
    gen.top_p, gen.top_k = cfg.top_p, (cfg.top_k or None)
    gen.eos_token_id, gen.pad_token_id = run.generator.eos_token_ids, run.tokenizer.pad_token_id
    example = run.eval_dataset[0]["prompt"] if run.eval_dataset is not None else run.train_dataset[0]["prompt"]

    def write(folder: Path) -> None:
        with restored_config(run.dropout_rates):  # the folder keeps the model's own dropout rates
            model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        run.tokenizer.save_pretrained(folder)
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        if summary is not None:
            (folder / "eval.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False),
                                              encoding="utf-8")
        card = model_card(cfg, run.start_model, run.sources, summary, example, run.tokenizer, out)
        (folder / "README.md").write_text(card, encoding="utf-8")

    write_final(out, write, checkpoint)


def strict_json(value):
    """NaN and +-inf -> None, recursively: what strict JSON (``allow_nan=False``) can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


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


def model_card(cfg, start_model: str, sources, summary: dict | None, example_prompt, tokenizer, out: Path) -> str:
    base = start_model if not is_local(start_model) else None
    dataset = cfg.dataset_name if not cfg.dataset_name.startswith("rloo:") else "trl-lib/tldr"
    front = {"library_name": "transformers", "tags": ["rloo", "reinforcement-learning", "text-generation"],
             "datasets": [dataset]}
    if base:
        front["base_model"] = base
    snippet = quick_start(str(out.resolve()), example_prompt, bool(tokenizer.chat_template), cfg.max_completion_length)
    rewards = ", ".join(f"`{n}` (weight {w:g})" for n, w in zip(sources.names, sources.weights))
    data_note = (
        "the real Reddit TL;DR sample bundled with rloo (1,445 training prompts in the `trl-lib/tldr` format, "
        "from OpenAI's *Learning to summarize from human feedback* release)"
        if cfg.dataset_name == "rloo:tldr" else f"`{cfg.dataset_name}` (split `{cfg.dataset_train_split}`)"
    )
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# Model card for {out.name}", "",
        f"This model is a fine-tuned version of `{start_model}` on {data_note}. It has been trained with "
        "[rloo](https://pypi.org/project/rloo/), an implementation of RLOO (REINFORCE Leave-One-Out).", "",
        "## Quick start", "", "```python", snippet.rstrip(), "```", "",
        "## Training procedure", "",
        "This model was trained with RLOO, a method introduced in *Back to Basics: Revisiting REINFORCE-Style "
        "Optimization for Learning from Human Feedback in LLMs* (Ahmadian et al., ACL 2024): for each prompt, "
        f"k = {cfg.num_generations} completions are sampled and each one's advantage is its reward minus the mean "
        "reward of its k - 1 siblings.", "",
        "| hyperparameter | value |", "|---|---|",
        f"| reward sources | {rewards} |",
        *(f"| {name} | {getattr(cfg, name)} |" for name in (
            "reward_model_name_or_path", "num_generations", "learning_rate", "lr_scheduler_type", "beta",
            "kl_estimator", "missing_eos_penalty", "temperature", "max_prompt_length", "max_completion_length",
            "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_iterations", "seed")),
        f"| optimizer steps run | {cfg.sizes.max_steps} |", "",
        "The full resolved configuration is in `config.yaml`, the per-step metrics in `metrics.jsonl`.", "",
    ]
    if summary is not None:
        lines += [
            "## Evaluation", "",
            f"Held-out reward on {summary['num_prompts']} `{cfg.dataset_eval_split}` prompts (one sampled completion "
            f"each, temperature {cfg.temperature}, same seed before and after):", "",
            "| | before | after |", "|---|---|---|",
            f"| reward | {summary['reward_before']:.4f} | {summary['reward_after']:.4f} |",
            *(f"| {k} | {summary['before'][k]:.4f} | {summary['after'][k]:.4f} |"
              for k in summary["before"] if k.startswith("rewards/") or k == "completion_length_mean"),
            "", f"Paired gain: {summary['gain']:+.4f} (standard error {summary['gain_se']:.4f}).", "",
        ]
    lines += ["## Framework versions", ""]
    lines += [f"- {name}: {v}" for name, v in package_versions().items()]
    lines += ["", "## Citations", "", "Cite RLOO as:", "", "```bibtex", RLOO_BIBTEX, "```", "",
              "The TL;DR data (Reddit posts and reference summaries; Webis-TLDR-17, CC BY 4.0):", "",
              "```bibtex", TLDR_BIBTEX, "```", ""]
    return "\n".join(lines)

"""The run folder of ``rloo sft``: the model (safetensors), tokenizer, config.yaml, eval.json and a model card
whose quick start loads it with ``transformers.pipeline``; written whole or not at all (final.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from rloo.card import TLDR_BIBTEX, model_label, package_versions, quick_start, reproduce_command
from rloo.final import write_final
from rloo.models import restored_config
from rloo.run_folder import strict_json


def save_sft_folder(run, eval_before: dict | None, eval_after: dict | None, checkpoint: Path | None = None,
                    tracker_links: dict[str, str] | None = None) -> None:
    cfg, out = run.cfg, run.output_dir
    model = run.accelerator.unwrap_model(run.policy)
    summary = {"before": eval_before, "after": eval_after}

    def write(folder: Path) -> None:
        with restored_config(run.dropout_rates):  # the folder keeps the model's own dropout rates
            model.save_pretrained(folder, safe_serialization=True)
        run.tokenizer.save_pretrained(folder)
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        (folder / "eval.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False), encoding="utf-8")
        (folder / "README.md").write_text(sft_card(run, summary, tracker_links or {}), encoding="utf-8")

    write_final(out, write, checkpoint)


def sft_card(run, summary: dict, tracker_links: dict[str, str]) -> str:
    cfg, out, hub_repo = run.cfg, run.output_dir, run.hub_repo
    label, base = model_label(run.model_name)
    tldr = cfg.dataset_name == "rloo:tldr"
    front = {"library_name": "transformers", "tags": ["rloo", "sft", "text-generation"],
             "datasets": ["trl-lib/tldr" if tldr else cfg.dataset_name]}
    if base:
        front["base_model"] = base
    data_note = ("the real Reddit TL;DR sample bundled with rloo (posts with their reference summaries, in the "
                 "`trl-lib/tldr` format)" if tldr else f"`{cfg.dataset_name}` (split `{cfg.dataset_train_split}`)")
    snippet = quick_start(hub_repo or out.name, run.example_prompt, bool(run.tokenizer.chat_template), 53)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# Model card for {hub_repo.split('/')[-1] if hub_repo else out.name}", "",
             f"This model is a supervised fine-tuned version of {label} on {data_note}, trained with "
             "[rloo](https://pypi.org/project/rloo/) (`rloo sft`).", "",
             "## Quick start", "",
             *([] if hub_repo else ["Run it from the directory that holds the run folder (or upload the folder to the "
                                    "Hub and name its repository):", ""]),
             "```python", snippet.rstrip(), "```", "", "## Training procedure", ""]
    lines += [f"[Visualize in {tracker}]({url})" for tracker, url in tracker_links.items()] + ([""] if tracker_links else [])
    trained = "the completion tokens (and their EOS)" if run.train.row_format == "prompt_completion" and \
        cfg.completion_only_loss is not False else "the assistant turns" if cfg.assistant_only_loss else "every token"
    lines += [f"Supervised fine-tuning: the mean negative log-likelihood of {trained}, over each optimizer step's "
              f"trained tokens. {len(run.train.examples)} training rows ({run.train.num_dropped} left out: longer than "
              f"max_length {cfg.max_length} before their first trained token).", "",
              "Train it again with:", "", "```bash", reproduce_command(cfg, run.model_name, out, "sft"), "```", "",
              "| hyperparameter | value |", "|---|---|",
              *(f"| {name} | {getattr(cfg, name)} |" for name in (
                  "learning_rate", "lr_scheduler_type", "max_length", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed")),
              f"| optimizer steps run | {cfg.sizes.max_steps} |", "", "## Results", ""]
    before, after = summary["before"], summary["after"]
    if after is not None:
        lines += [f"Held-out completion loss (mean negative log-likelihood per trained token, {after['num_rows']} rows of "
                  f"split `{cfg.dataset_eval_split}`):", "", "| | loss | perplexity |", "|---|---|---|",
                  *([f"| before | {before['loss']:.4f} | {before['perplexity']:.2f} |"] if before else []),
                  f"| after | {after['loss']:.4f} | {after['perplexity']:.2f} |", ""]
    else:
        lines += ["No held-out rows were evaluated.", ""]
    lines += ["## Framework versions", "", *(f"- {name}: {v}" for name, v in package_versions().items()), ""]
    if tldr:
        lines += ["## Citations", "", "The TL;DR data (Reddit posts and reference summaries; Webis-TLDR-17, CC BY 4.0):",
                  "", "```bibtex", TLDR_BIBTEX, "```", ""]
    return "\n".join(lines)

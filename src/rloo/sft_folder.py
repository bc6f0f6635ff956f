"""The run folder of ``rloo sft``: the model (safetensors), tokenizer, config.yaml, eval.json and a model card
whose quick start loads it with ``transformers.pipeline``; written whole or not at all (final.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from rloo.card import model_label, quick_start, stage_card_parts
from rloo.run_folder import save_stage_folder


def save_sft_folder(run, rows, eval_before: dict | None, eval_after: dict | None, checkpoint: Path | None = None,
                    tracker_links: dict[str, str] | None = None) -> None:
    """``rows``: the training rows as tokenized (sft_data.SFTExamples), for the card."""
    save_stage_folder(run, eval_before, eval_after, lambda summary: sft_card(run, rows, summary, tracker_links or {}),
                      checkpoint)


def sft_card(run, rows, summary: dict, tracker_links: dict[str, str]) -> str:
    cfg, out, hub_repo = run.cfg, run.output_dir, run.hub_repo
    label, base = model_label(run.model_name)
    tldr = cfg.dataset_name == "rloo:tldr"
    front = {"library_name": "transformers", "tags": ["rloo", "sft", "text-generation"],
             "datasets": ["trl-lib/tldr" if tldr else cfg.dataset_name]}
    if base:
        front["base_model"] = base
    again, tail = stage_card_parts(run, "sft", tldr)
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
    trained = "the completion tokens (and their EOS)" if rows.row_format == "prompt_completion" and \
        cfg.completion_only_loss is not False else "the assistant turns" if cfg.assistant_only_loss else "every token"
    lines += [f"Supervised fine-tuning: the mean negative log-likelihood of {trained}, over each optimizer step's "
              f"trained tokens. {len(rows.examples)} training rows ({rows.num_dropped} left out: longer than "
              f"max_length {cfg.max_length} before their first trained token).", "",
              *again, "## Results", ""]
    before, after = summary["before"], summary["after"]
    if after is not None:
        lines += [f"Held-out completion loss (mean negative log-likelihood per trained token, {after['num_rows']} rows of "
                  f"split `{cfg.dataset_eval_split}`):", "", "| | loss | perplexity |", "|---|---|---|",
                  *([f"| before | {before['loss']:.4f} | {before['perplexity']:.2f} |"] if before else []),
                  f"| after | {after['loss']:.4f} | {after['perplexity']:.2f} |", ""]
    else:
        lines += ["No held-out rows were evaluated.", ""]
    lines += tail
    return "\n".join(lines)

"""The run folder of ``rloo reward-model``: the sequence classifier (safetensors), tokenizer, config.yaml,
eval.json and a model card whose quick start scores a text with ``transformers.pipeline``; written whole or
not at all (final.py). The folder is what ``rloo train --reward_model_name_or_path`` takes."""

from __future__ import annotations

from pathlib import Path

import yaml

from rloo.card import model_label, stage_card_parts
from rloo.run_folder import save_stage_folder


def save_reward_folder(run, pairs, eval_before: dict | None, eval_after: dict | None, checkpoint: Path | None = None,
                       tracker_links: dict[str, str] | None = None) -> None:
    """``pairs``: the training pairs as tokenized (preference_data.PreferencePairs), for the card."""
    save_stage_folder(run, eval_before, eval_after, lambda summary: reward_card(run, pairs, summary, tracker_links or {}),
                      checkpoint)


def quick_start(model_path: str, text: str) -> str:
    return ("from transformers import pipeline\n\n"
            f"scorer = pipeline(\"text-classification\", model={model_path!r}, function_to_apply=\"none\")\n"
            f"text = {text!r}\n"
            "print(scorer(text)[0][\"score\"])  # higher: more preferred\n")


def reward_card(run, pairs, summary: dict, tracker_links: dict[str, str]) -> str:
    cfg, out, hub_repo = run.cfg, run.output_dir, run.hub_repo
    label, base = model_label(run.model_name)
    tldr = cfg.dataset_name in ("rloo:tldr-preference", "rloo:tldr")
    front = {"library_name": "transformers", "tags": ["rloo", "reward-model", "text-classification"],
             "datasets": ["openai/summarize_from_feedback" if tldr else cfg.dataset_name]}
    if base:
        front["base_model"] = base
    again, tail = stage_card_parts(run, "reward-model", tldr)
    data_note = ("the human preference pairs of OpenAI's *Learning to summarize from human feedback* bundled with "
                 "rloo (two summaries of a Reddit post, the one people preferred first)" if tldr else
                 f"`{cfg.dataset_name}` (split `{cfg.dataset_train_split}`)")
    example = run.example_prompt
    text = (example.get("prompt") or "") + example["chosen"] if isinstance(example.get("chosen"), str) else "TL;DR: ..."
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# Model card for {hub_repo.split('/')[-1] if hub_repo else out.name}", "",
             f"This reward model is {label} with a one-label sequence-classification head, trained with "
             f"[rloo](https://pypi.org/project/rloo/) (`rloo reward-model`) on {data_note}. Its score is read at "
             "the last token of the text; rloo appends the tokenizer's EOS to a summary before scoring it, as in "
             "training.", "", "## Quick start", "",
             *([] if hub_repo else ["Run it from the directory that holds the run folder (or upload the folder to the "
                                    "Hub and name its repository):", ""]),
             "```python", quick_start(hub_repo or out.name, text + (run.tokenizer.eos_token or "")).rstrip(), "```", "",
             "As the reward of `rloo train`: `--reward_model_name_or_path` this folder.", "",
             "## Training procedure", ""]
    lines += [f"[Visualize in {tracker}]({url})" for tracker, url in tracker_links.items()] + ([""] if tracker_links else [])
    lines += ["Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected)"
              + (f" + {cfg.center_rewards_coefficient} (r_chosen + r_rejected)^2" if cfg.center_rewards_coefficient else "")
              + f", averaged over each optimizer step's pairs. {len(pairs.chosen_ids)} training pairs ({pairs.num_dropped} "
              f"left out: longer than max_length {cfg.max_length}).", "",
              *again, "## Results", ""]
    before, after = summary["before"], summary["after"]
    if after is not None:
        lines += [f"Held-out pairwise accuracy (chosen scored higher; a tie counts as wrong), {after['num_pairs']} pairs "
                  f"of split `{cfg.dataset_eval_split}`, with its standard error:", "",
                  "| | accuracy | loss |", "|---|---|---|",
                  *([f"| before | {before['accuracy']:.3f} ± {before['accuracy_se']:.3f} | {before['loss']:.4f} |"]
                    if before else []),
                  f"| after | {after['accuracy']:.3f} ± {after['accuracy_se']:.3f} | {after['loss']:.4f} |", ""]
        if "centering" in after:
            c = after["centering"]
            lines += [f"Centered on the reference completions of `{c['dataset']}` ({c['num_rows']} rows, the N+ recipe): "
                      f"their mean score was {c['reference_mean_before']:.4f} after training and is "
                      f"{c['reference_mean_after']:.4f} in this folder (the offset is in the weights).", ""]
    else:
        lines += ["No held-out pairs were evaluated.", ""]
    lines += tail
    return "\n".join(lines)

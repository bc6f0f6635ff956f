"""The run folder: a Hugging Face model folder plus what explains it (config, metrics, eval, report, model card)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from rloo.adapters import has_adapters, save_adapter_folder
from rloo.card import model_card
from rloo.final import write_final
from rloo.models import restored_config


def save_run_folder(run, summary: dict | None, state_dict: dict | None = None, checkpoint: Path | None = None,
                    tracker_links: dict[str, str] | None = None) -> None:
    """Weights (safetensors), config, tokenizer, generation config, resolved YAML, eval.json, report.html with
    its plots, README.md, written whole or not at all (``write_final``). ``state_dict``: the policy's weights
    when gathered from shards (FSDP / ZeRO-3), else its own; ``checkpoint``: where the same weights are saved,
    named if the write fails; ``tracker_links``: the trackers' pages of the run, linked from the card."""
    cfg, out = run.cfg, run.output_dir
    model = run.accelerator.unwrap_model(run.policy)
    gen = model.generation_config
    gen.do_sample, gen.temperature, gen.max_new_tokens = True, cfg.temperature, cfg.max_completion_length
    gen.top_p, gen.top_k = cfg.top_p, (cfg.top_k or None)
    gen.eos_token_id, gen.pad_token_id = run.generator.eos_token_ids, run.tokenizer.pad_token_id
    example = run.eval_dataset[0]["prompt"] if run.eval_dataset is not None else run.train_dataset[0]["prompt"]

    def write(folder: Path) -> None:
        with restored_config(run.dropout_rates):  # the folder keeps the model's own dropout rates
            if has_adapters(model):  # LoRA: the adapter, and with merge_adapter the merged model
                save_adapter_folder(model, folder, run.model_name, cfg.merge_adapter)
            else:
                model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        run.tokenizer.save_pretrained(folder)
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        if summary is not None:
            (folder / "eval.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False),
                                              encoding="utf-8")
        from rloo.report import write_report  # matplotlib, imported only when a run ends

        plots = [str(path.relative_to(folder)) for path in write_report(out, folder)]
        card = model_card(cfg, run.model_name, run.sources, summary, example, run.tokenizer, out, hub_repo=run.hub_repo,
                          plots=plots, tracker_links=tracker_links or {}, metrics=_read_jsonl(out / "metrics.jsonl"),
                          adapter=("merged" if cfg.merge_adapter else "adapter") if has_adapters(model) else None)
        (folder / "README.md").write_text(card, encoding="utf-8")

    write_final(out, write, checkpoint)


def save_stage_folder(run, before: dict | None, after: dict | None, card, checkpoint: Path | None = None) -> None:
    """A supervised stage's run folder (rloo sft, rloo reward-model): the model, tokenizer, config.yaml,
    eval.json ({"before", "after"}) and README.md (``card(summary)``), written whole or not at all."""
    model = run.accelerator.unwrap_model(run.policy)
    summary = {"before": before, "after": after}

    def write(folder: Path) -> None:
        with restored_config(run.dropout_rates):  # the folder keeps the model's own dropout rates
            model.save_pretrained(folder, safe_serialization=True)
        run.tokenizer.save_pretrained(folder)
        (folder / "config.yaml").write_text(yaml.safe_dump(run.cfg.to_dict(), sort_keys=False), encoding="utf-8")
        (folder / "eval.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False), encoding="utf-8")
        (folder / "README.md").write_text(card(summary), encoding="utf-8")

    write_final(run.output_dir, write, checkpoint)


def strict_json(value):
    """NaN and +-inf -> None, recursively: what strict JSON (``allow_nan=False``) can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows

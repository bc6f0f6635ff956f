"""Held-out evaluation inside a run: before the first step (``eval_on_start``), every ``eval_steps`` steps
(``eval_strategy steps``) and after the last; each one a metrics.jsonl line of ``eval/`` figures, the first
and the last compared in eval.json and the model card."""

from __future__ import annotations

import logging
import math

from rloo.held_out import evaluate, paired_gain
from rloo.run import Run, sync_generator, trainer_state

logger = logging.getLogger(__name__)


def run_evaluation(run: Run, step: int) -> dict | None:
    """The held-out evaluation of the policy after ``step`` optimizer steps (0: before training); None when
    the run has no held-out prompts."""
    if run.eval_dataset is None or run.cfg.num_eval_samples == 0:
        return None
    sync_generator(run)
    policy = run.accelerator.unwrap_model(run.policy)
    result = evaluate(policy, run.tokenizer, run.eval_dataset, run.sources, run.cfg, run.cfg.num_eval_samples,
                      accelerator=run.accelerator, generator=run.generator, autocast=run.autocast,
                      trainer_state=trainer_state(run, step + 1))
    policy.train()
    if run.accelerator.is_main_process:
        logger.info("held-out reward after %d steps: %.4f", step, result["reward_mean"])
    return result


def eval_interval(cfg) -> int | None:
    """Steps between periodic evaluations (transformers' rule: eval_steps, a fraction of max_steps rounded up
    when below 1, logging_steps when unset); None without eval_strategy steps."""
    if cfg.eval_strategy != "steps":
        return None
    steps = cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps
    if steps < 1:
        steps = math.ceil(steps * cfg.sizes.max_steps)
    return int(steps)


def eval_line(step: int, result: dict) -> dict:
    """One metrics.jsonl line of an evaluation: its figures under ``eval/``, at its step."""
    line = {"step": step, "eval/reward": result["reward_mean"], "eval/reward_std": result["reward_std"]}
    line.update({f"eval/{key}": value for key, value in result.items() if key.startswith("rewards/")})
    line.update({"eval/completion_length": result["completion_length_mean"], "eval/num_prompts": result["num_prompts"],
                 "eval/num_unscorable": result["num_unscorable"]})
    return {key: value if value == value else None for key, value in line.items()}  # NaN -> null


def summarize(before: dict | None, after: dict | None) -> dict | None:
    """The held-out comparison printed at the end of a run and written to eval.json: before and after, their
    paired gain, and the first prompts' completions side by side. Only "after" without eval_on_start."""
    if after is None:
        return None
    public = lambda result: {k: v for k, v in result.items() if not k.startswith("per_prompt")}  # noqa: E731
    if before is None:
        return {"reward_after": after["reward_mean"], "num_prompts": after["num_prompts"], "after": public(after),
                "samples": [{"prompt": s["prompt"], "after": s["completion"], "reward_after": s["reward"]}
                            for s in after.get("per_prompt_samples", [])]}
    gain = paired_gain(before, after)
    return {
        "reward_before": before["reward_mean"],
        "reward_after": after["reward_mean"],
        "gain": gain["gain"],
        "gain_se": gain["se"],
        "gain_z": gain["z"],
        "gain_relative": gain["relative"],
        "num_prompts": after["num_prompts"],
        "before": public(before),
        "after": public(after),
        "samples": [{"prompt": b["prompt"], "before": b["completion"], "after": a["completion"],
                     "reward_before": b["reward"], "reward_after": a["reward"]}
                    for b, a in zip(before.get("per_prompt_samples", []), after.get("per_prompt_samples", []))],
    }

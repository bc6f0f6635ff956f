"""Held-out evaluation: one sampled completion per prompt, scored with the run's reward sources."""

from __future__ import annotations

import contextlib
import math

import torch

from rloo.data import gather_rows, render_prompt, tokenize_prompts
from rloo.distributed import gathered_for_generation, lockstep
from rloo.generation import build_generator, prompt_seeds
from rloo.models import eos_token_ids, prompt_token_limit
from rloo.rewards import RewardSources
from rloo.rollout import sample, score


NUM_KEPT_SAMPLES = 8  # completions kept per evaluation (the first prompts'), shown side by side in the report


@torch.no_grad()
def evaluate(model, tokenizer, dataset, sources: RewardSources, cfg, num_samples: int | None = None,
             seed: int = 1234, batch_size: int = 50, accelerator=None, generator=None, autocast=None,
             trainer_state=None) -> dict:
    """Score one completion (sampled at the training temperature, fixed seed) for each of the first
    ``num_samples`` prompts of ``dataset``. Returns reward_mean/std, per-source means, completion
    length, num_prompts and the per-prompt rewards (for paired before/after comparisons).

    With an ``accelerator`` of several processes, each scores a contiguous share of the prompts and
    the per-prompt results are gathered (each prompt's seed is its own, so the figures do not change).
    Every process scores the same number of prompts (the last shares topped up with prompts from the
    start, whose results are dropped): under FSDP / ZeRO-3 each forward is a collective. ``autocast``: the
    compute dtype's context (a run's ``Run.autocast``), as training computes. Reward functions get TRL's
    keywords here too: ``trainer_state`` (the optimizer steps done; a fresh TrainerState when not given),
    and ``log_metric`` / ``log_extra``, whose values are not kept for evaluation."""
    from transformers import TrainerState

    shared = {"trainer_state": trainer_state or TrainerState(), "log_metric": lambda name, value: None,
              "log_extra": lambda column, values: None}
    own = generator is None  # else the run's own (a vLLM engine is not started twice)
    if own:
        generator = build_generator(cfg, model, tokenizer, eos_token_ids(model, tokenizer),
                                    lockstep(accelerator, cfg.ds3_gather_for_generation))
    try:
        with (autocast or contextlib.nullcontext)():
            return _evaluate(model, tokenizer, dataset, sources, cfg, generator, accelerator, num_samples, seed,
                             batch_size, shared)
    finally:
        if own:
            generator.close()


def _evaluate(model, tokenizer, dataset, sources, cfg, generator, accelerator, num_samples, seed, batch_size, shared):
    num_samples = min(num_samples or len(dataset), len(dataset))
    processes = accelerator.num_processes if accelerator is not None else 1
    share = -(-num_samples // processes)
    first = share * (accelerator.process_index if accelerator is not None else 0)
    mine = [row % num_samples for row in range(first, first + share)] if processes > 1 and num_samples else range(num_samples)
    num_mine = max(0, min(share, num_samples - first))  # the rows of this share that are not top-up
    gather = cfg.ds3_gather_for_generation
    device = next(model.parameters()).device
    limit = prompt_token_limit(model, cfg.max_prompt_length, cfg.max_completion_length)
    rewards, scores, lengths, texts_kept = [], [], [], []
    # A fixed seed makes "before" and "after" draw the same random numbers, so their difference is paired.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(mine), batch_size):
            indices = list(mine[start : start + batch_size])
            prompts, columns = gather_rows(dataset, indices)
            texts = [render_prompt(p, tokenizer, cfg.chat_template_kwargs) for p in prompts]
            prompt_ids = tokenize_prompts(texts, tokenizer, limit, warn=False).input_ids
            with gathered_for_generation(accelerator, model, gather):
                rollout = sample(generator, tokenizer, texts, prompt_ids, columns, 1, device,
                                 prompt_seeds(seed, 0, indices), raw_prompts=prompts)
            rollout = score(rollout, sources, cfg.missing_eos_penalty, shared=shared)
            texts_kept += [{"prompt": p, "completion": c} for p, c in zip(prompts, rollout.completions)]
            rewards.append(rollout.rewards_BF.cpu())
            scores.append(rollout.scores_B.cpu())
            lengths.append(rollout.completion_mask_BT.sum(1).float().cpu())
    rewards_NF = torch.cat(rewards) if rewards else torch.zeros(0, len(sources.names))
    scores_N = torch.cat(scores) if scores else torch.zeros(0)
    lengths_N = torch.cat(lengths) if lengths else torch.zeros(0)
    texts_kept = texts_kept[:num_mine]
    if processes > 1:  # every share has the same length: gather in rank order, drop the top-up rows
        from accelerate.utils import gather_object

        texts_kept = gather_object(texts_kept)
        table = torch.cat([rewards_NF, scores_N[:, None], lengths_N[:, None]], 1)
        table[num_mine:] = float("nan")
        everything = accelerator.gather(table.to(accelerator.device)).cpu()[:num_samples]
        rewards_NF, scores_N, lengths_N = everything[:, :-2], everything[:, -2], everything[:, -1]
    finite = scores_N[torch.isfinite(scores_N)]
    result = {
        "reward_mean": finite.mean().item() if len(finite) else math.nan,
        "reward_std": finite.std().item() if len(finite) > 1 else 0.0,
        "reward_sem": (finite.std() / math.sqrt(len(finite))).item() if len(finite) > 1 else 0.0,
    }
    for f, name in enumerate(sources.names):
        result[f"rewards/{name}"] = torch.nanmean(rewards_NF[:, f]).item()
    result.update(
        completion_length_mean=lengths_N.mean().item(),
        num_prompts=num_samples,
        num_unscorable=int((~torch.isfinite(scores_N)).sum()),
        per_prompt_rewards=scores_N.tolist(),
        per_prompt_rewards_by_source={name: rewards_NF[:, f].tolist() for f, name in enumerate(sources.names)},
        # the first prompts' completions, for the report's before / after table
        per_prompt_samples=[dict(row, reward=scores_N[i].item() if torch.isfinite(scores_N[i]) else None)
                            for i, row in enumerate(texts_kept[:NUM_KEPT_SAMPLES])],
    )
    return result


def paired_gain(before: dict, after: dict, key: str = "per_prompt_rewards") -> dict:
    """Mean per-prompt gain after - before, its standard error and z = gain / se."""
    b, a = torch.tensor(before[key]), torch.tensor(after[key])
    ok = torch.isfinite(a) & torch.isfinite(b)
    diff = (a - b)[ok]
    gain = diff.mean().item()
    se = (diff.std() / math.sqrt(len(diff))).item() if len(diff) > 1 else math.inf
    return {"gain": gain, "se": se, "z": gain / se if se > 0 else math.inf,
            "relative": gain / abs(b[ok].mean().item()) if b[ok].mean().item() else math.inf}

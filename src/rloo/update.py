"""Phase 4, the policy-gradient update: micro-batches, the clipped loss over the step's whole batch,
gradient accumulation (DDP no_sync), the non-finite guard; and the step's figures over processes."""

from __future__ import annotations

import contextlib
import math

import torch

from rloo import objective
from rloo.models import completion_logprobs
from rloo.rollout import Rollout, add_advantages
from rloo.run import Run


def normalize_over_processes(run: Run, advantages_B: torch.Tensor) -> torch.Tensor:
    """objective.normalize_advantages over the step's whole batch (every process), this process's part."""
    if run.accelerator.num_processes == 1:
        return objective.normalize_advantages(advantages_B)
    everything_B = objective.normalize_advantages(run.accelerator.gather(advantages_B.contiguous()))
    return everything_B.view(run.accelerator.num_processes, -1)[run.accelerator.process_index]


def across_processes(run: Run, rollout: Rollout, update: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The step's per-completion tensors from every process (gathered, rank order) and its update
    figures reduced over processes (loss and clip ratio averaged: each process's loss is its share)."""
    samples = {
        "scores_B": rollout.scores_B, "rewards_BF": rollout.rewards_BF, "kl_B": rollout.kl_B,
        "lengths_B": rollout.completion_mask_BT.sum(1), "truncated_B": rollout.truncated_B,
        "advantages_B": update["advantages_B"], "logprob_gap_sum_B": update["logprob_gap_sum_B"],
    }
    if run.accelerator.num_processes == 1:
        return samples, update
    gather = run.accelerator.gather
    samples = {name: gather(tensor.contiguous()) for name, tensor in samples.items()}
    device = run.accelerator.device
    totals = gather(torch.tensor([[update["loss"], update["clip_ratio"], update["entropy_sum"], update["num_tokens"]]],
                                 dtype=torch.float64, device=device))
    update = dict(update, loss=totals[:, 0].mean().item(), clip_ratio=totals[:, 1].mean().item(),
                  entropy=(totals[:, 2].sum() / totals[:, 3].sum().clamp(min=1)).item())
    return samples, update



def policy_update(run: Run, rollout: Rollout) -> dict[str, float]:
    """Phase 4: one optimizer step over the rollout in micro-batches of whole prompt groups.

    The loss divides by the step's total sequence count, so accumulating micro-batches equals one
    big batch. When the batch is used once, the training forward doubles as the old-policy pass
    (old = detached current log-probs, ratio = 1), so no extra forward is spent on it. A non-finite
    loss or gradient norm skips the optimizer step (``skipped``).
    """
    cfg, sizes = run.cfg, run.cfg.sizes
    num_sequences = rollout.completion_ids_BT.shape[0]
    totals = {"loss": 0.0, "clip_ratio": 0.0, "entropy": 0.0, "num_tokens": 0.0}
    kl_B, advantages_B, gap_B = [], [], []
    micro_batches = list(rollout.micro_batches(sizes.num_prompts_per_micro_batch))
    for index, mb in enumerate(micro_batches):
        # Across processes, gradients are averaged once, after the step's last micro-batch (DDP no_sync).
        last = index == len(micro_batches) - 1
        run.accelerator.sync_gradients = last  # DeepSpeed steps its optimizer in the backward that syncs
        with contextlib.nullcontext() if last else run.accelerator.no_sync(run.policy):
            loss, entropy_BT, loss_metrics = micro_batch_loss(run, mb, num_sequences)
            run.accelerator.backward(loss)
        mb_size = mb.completion_ids_BT.shape[0]
        totals["loss"] += loss.item()
        totals["clip_ratio"] += loss_metrics["clip_ratio"].item() * mb_size / num_sequences
        totals["entropy"] += entropy_BT.sum().item()
        totals["num_tokens"] += mb.completion_mask_BT.sum().item()
        kl_B.append(mb.kl_B if mb.kl_B is not None else torch.zeros(mb_size, device=mb.scores_B.device))
        advantages_B.append(mb.advantages_B)
        gap_B.append(loss_metrics.get("logprob_gap_sum_B", torch.full((mb_size,), math.nan, device=mb.scores_B.device)))
    grad_norm = run.accelerator.clip_grad_norm_(run.policy.parameters(), cfg.max_grad_norm or math.inf)
    grad_norm = math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed: its norm (None before a step)
    # A non-finite loss or gradient would poison the weights and Adam's moments: skip the update (counted).
    # (Under DeepSpeed the update already happened inside the last backward: only counted.)
    skipped = not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm))
    if run.accelerator.num_processes > 1:  # every process skips, or none does
        flag = torch.tensor([skipped], dtype=torch.int32, device=run.accelerator.device)
        skipped = bool(run.accelerator.reduce(flag, "max").item())
    if not skipped:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.generator_stale = True
    if rollout.kl_B is None:
        rollout.kl_B = torch.cat(kl_B).detach()
    return {
        "loss": totals["loss"],
        "clip_ratio": totals["clip_ratio"],
        "entropy": totals["entropy"] / max(totals["num_tokens"], 1.0),
        "entropy_sum": totals["entropy"],
        "num_tokens": totals["num_tokens"],
        "grad_norm": grad_norm if not skipped else None,
        "skipped": skipped,
        "advantages_B": torch.cat(advantages_B).detach(),
        "logprob_gap_sum_B": torch.cat(gap_B),
    }


def micro_batch_loss(run: Run, mb: Rollout, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The training forward of one micro-batch, its advantages when not computed up front, and its
    share of the step's loss (divided by the step's ``num_sequences``)."""
    cfg = run.cfg
    logprobs_BT, entropy_BT = completion_logprobs(run.policy, mb.prompt_ids_PL, mb.prompt_mask_PL,
                                                  mb.completion_ids_BT, mb.completion_mask_BT, cfg.temperature,
                                                  with_entropy=True, share_prompt=cfg.share_prompt_prefix)
    old_logprobs_BT = mb.old_logprobs_BT if mb.old_logprobs_BT is not None else logprobs_BT.detach()
    if mb.advantages_B is None:
        add_advantages(mb, old_logprobs_BT, cfg.beta, cfg.kl_estimator)
    loss_mask_BT = mb.completion_mask_BT
    if cfg.mask_truncated_completions:
        loss_mask_BT = loss_mask_BT * (~mb.truncated_B).long()[:, None]
    loss, loss_metrics = objective.policy_loss(
        logprobs_BT, old_logprobs_BT, mb.advantages_B, loss_mask_BT, num_sequences,
        cfg.epsilon, cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon,
    )
    if mb.sampler_logprobs_BT is not None:  # vLLM's log-probs against the training model's, per completion
        gap_BT = (mb.sampler_logprobs_BT - old_logprobs_BT).abs() * mb.completion_mask_BT
        loss_metrics["logprob_gap_sum_B"] = gap_BT.sum(1).detach()
    return loss, entropy_BT, loss_metrics



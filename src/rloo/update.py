"""Phase 4, the policy-gradient update: micro-batches, the clipped loss over the step's whole batch,
gradient accumulation (DDP no_sync), the non-finite guard; and the step's figures over processes."""

from __future__ import annotations

import contextlib
import math

import torch

from rloo import objective
from rloo.architecture import RouterLogits
from rloo.errors import NonFiniteWeightsError
from rloo.logprobs import completion_logprobs
from rloo.rollout import Rollout, add_advantages
from rloo.run import Run


def normalize_over_processes(run: Run, advantages_B: torch.Tensor) -> torch.Tensor:
    """objective.normalize_advantages over the step's whole batch (every process), this process's part."""
    if run.accelerator.num_processes == 1:
        return objective.normalize_advantages(advantages_B)
    everything_B = objective.normalize_advantages(run.accelerator.gather(advantages_B.contiguous()))
    return everything_B.view(run.accelerator.num_processes, -1)[run.accelerator.process_index]


def across_processes(run: Run, rollout: Rollout, update: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The generation batch's per-completion tensors from every process (gathered, rank order) and the
    step's update figures reduced over processes (loss and clip ratio averaged: each process's loss is its
    share; token sums added)."""
    advantages_B = rollout.advantages_B if rollout.advantages_B is not None else update["advantages_B"]
    samples = {
        "scores_B": rollout.scores_B, "rewards_BF": rollout.rewards_BF, "kl_B": rollout.kl_B,
        "lengths_B": rollout.completion_mask_BT.sum(1), "truncated_B": rollout.truncated_B,
        "advantages_B": advantages_B,
    }
    if run.accelerator.num_processes == 1:
        return samples, update
    gather = run.accelerator.gather
    samples = {name: gather(tensor.contiguous()) for name, tensor in samples.items()}
    device = run.accelerator.device
    totals = gather(torch.tensor([[update["loss"], update["clip_ratio"], update["entropy_sum"], update["num_tokens"],
                                   update["logprob_gap_sum"], update["aux_loss"], update["num_sequences"]]],
                                 dtype=torch.float64, device=device))
    update = dict(update, loss=totals[:, 0].mean().item(), clip_ratio=totals[:, 1].mean().item(),
                  entropy=(totals[:, 2].sum() / totals[:, 3].sum().clamp(min=1)).item(),
                  num_tokens=totals[:, 3].sum().item(), logprob_gap_sum=totals[:, 4].sum().item(),
                  aux_loss=totals[:, 5].mean().item(), num_sequences=int(totals[:, 6].sum().item()))
    return samples, update


def policy_update(run: Run, rollout: Rollout, start: int, stop: int) -> dict[str, float]:
    """Phase 4: one optimizer step over completion rows [start, stop) of the generation batch, in
    micro-batches of ``per_device_train_batch_size`` completions (which may cut through prompt groups).

    The loss divides by the step's total sequence count, so accumulating micro-batches equals one
    big batch. When the batch is trained on whole and once (``trainer.upfront``), the training forward
    doubles as the old-policy pass (old = detached current log-probs, ratio = 1) and each micro-batch's
    groups get their advantages there. A non-finite loss or gradient norm skips the optimizer step
    (``skipped``). Mixture-of-experts policies add ``aux_loss_coef`` times the router load-balancing loss.
    """
    cfg, sizes = run.cfg, run.cfg.sizes
    num_sequences = stop - start
    totals = dict.fromkeys(("loss", "clip_ratio", "entropy", "num_tokens", "logprob_gap_sum", "aux_loss"), 0.0)
    kl_B, advantages_B = [], []
    micro_batches = list(rollout.rows(start, stop).row_batches(sizes.num_completions_per_micro_batch))
    run.guard.take()  # the weights and optimizer state before this step, copied while it computes (guard.py)
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
        totals["logprob_gap_sum"] += loss_metrics["logprob_gap_sum"]
        totals["aux_loss"] += loss_metrics["aux_loss"] * mb_size / num_sequences
        kl_B.append(mb.kl_B if mb.kl_B is not None else torch.zeros(mb_size, device=mb.scores_B.device))
        advantages_B.append(mb.advantages_B)
    grad_norm = run.accelerator.clip_grad_norm_(run.policy.parameters(), cfg.max_grad_norm or math.inf)
    grad_norm = math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed: its norm (None before a step)
    # A non-finite loss or gradient would poison the weights and Adam's moments: skip the update (counted).
    # (Under DeepSpeed the update already happened inside the last backward: only counted. With fp16 loss
    # scaling, an overflow is the scaler's to skip: it lowers the scale, and the step is not counted.)
    scaler = run.accelerator.scaler
    overflow = scaler is not None and not math.isfinite(grad_norm) and math.isfinite(totals["loss"])
    skipped = not (math.isfinite(totals["loss"]) and (math.isfinite(grad_norm) or overflow))
    if run.accelerator.num_processes > 1:  # every process skips, or none does
        flag = torch.tensor([skipped], dtype=torch.int32, device=run.accelerator.device)
        skipped = bool(run.accelerator.reduce(flag, "max").item())
    reason = "non-finite loss or gradient norm"
    if not skipped:
        run.guard.ready()
        try:
            run.optimizer.step()  # with a scaler: skipped by it on an overflow, which then lowers the scale
            finite = None
        except RuntimeError as err:  # torch's foreach AdamW: a step size beyond float32 ("without overflow")
            if "overflow" not in str(err):
                raise
            finite = False  # possibly applied to some tensors already: undone below
        if not weights_finite(run, finite):
            if not run.guard.undoable:
                raise NonFiniteWeightsError("the update left non-finite weights, which cannot be undone here "
                                            "(FSDP / DeepSpeed, or undo_nonfinite_updates false); lower "
                                            "learning_rate")
            run.guard.undo()  # as if the step had been skipped: weights and Adam moments as before
            skipped, reason = True, "non-finite weights after the update (undone)"
    run.guard.release()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.generator_stale = True
    if rollout.kl_B is None and num_sequences == rollout.completion_ids_BT.shape[0]:  # the whole batch at once
        rollout.kl_B = torch.cat(kl_B).detach()
    return {
        **totals,
        "num_sequences": num_sequences,  # the completions this step trained on (its slice of the generation batch)
        "entropy": totals["entropy"] / max(totals["num_tokens"], 1.0),
        "entropy_sum": totals["entropy"],
        "grad_norm": grad_norm if math.isfinite(grad_norm) and not skipped else None,
        "skipped": skipped,
        "skipped_reason": reason if skipped else None,
        "advantages_B": torch.cat(advantages_B).detach(),
    }


def weights_finite(run: Run, finite: bool | None = None) -> bool:
    """Every parameter finite on every process (all agree, so all undo or none); ``finite`` False: known not."""
    finite = run.guard.finite() if finite is None else finite
    if run.accelerator.num_processes > 1:
        flag = torch.tensor([not finite], dtype=torch.int32, device=run.accelerator.device)
        finite = not run.accelerator.reduce(flag, "max").item()
    return finite


def micro_batch_loss(run: Run, mb: Rollout, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The training forward of one micro-batch (under the run's compute dtype), its advantages when not
    computed up front, and its share of the step's loss (divided by the step's ``num_sequences``)."""
    cfg = run.cfg
    router = RouterLogits(run.policy) if run.aux_loss_coef else None
    try:
        with run.autocast():
            logprobs_BT, entropy_BT = completion_logprobs(run.policy, mb.prompt_ids_PL, mb.prompt_mask_PL,
                                                          mb.completion_ids_BT, mb.completion_mask_BT, cfg.temperature,
                                                          with_entropy=True, share_prompt=cfg.share_prompt_prefix,
                                                          router=router)
            aux_loss = router.loss() if router is not None else None
    finally:
        if router is not None:
            router.close()
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
    loss_metrics["aux_loss"] = 0.0
    if aux_loss is not None:  # each micro-batch's share, as the policy loss's
        loss = loss + run.aux_loss_coef * aux_loss * (mb.completion_ids_BT.shape[0] / num_sequences)
        loss_metrics["aux_loss"] = aux_loss.item()
    loss_metrics["logprob_gap_sum"] = math.nan
    if mb.sampler_logprobs_BT is not None:  # the sampler's log-probs against the training pass's
        loss_metrics["logprob_gap_sum"] = ((mb.sampler_logprobs_BT - old_logprobs_BT).abs() * mb.completion_mask_BT).sum().item()
    return loss, entropy_BT, loss_metrics

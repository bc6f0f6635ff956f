"""The RLOO math: scores, KL penalty, leave-one-out advantages and the policy loss.

Every equation of the method lives here as a pure function of tensors (torch only), with the
shapes in the names: P prompts, K completions per prompt, B = P*K sequences, T completion
tokens, N samples, F reward sources. Masks hold 1 (or True) on real completion tokens.
See DESIGN.md §2 and Ahmadian et al. 2024 (RLOO_PAPER).
"""

from __future__ import annotations

import torch
from torch import Tensor

RLOO_PAPER = "Ahmadian et al., ACL 2024, arXiv:2402.14740"

# |log rho| beyond this is clamped before exp: exp(20) ~ 5e8 is far outside any trust region,
# and an inf ratio would turn the zero gradient of the inactive min branch into NaN (inf * 0).
# verl clamps its log-ratio the same way.
_MAX_LOG_RATIO = 20.0


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """float32 at least (bf16/fp16 sums of log-probs lose too much), float64 stays float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _masked_sum_T(values_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """sum_t values over real tokens; where() (not a product) keeps inf/NaN in padding out."""
    return torch.where(mask_BT.bool(), values_BT, torch.zeros_like(values_BT)).sum(dim=-1)


def combine_rewards(rewards_NF: Tensor, weights_F: Tensor) -> Tensor:
    """Weighted score of each sample over the reward sources that could score it.

    ``scores_N[n] = sum_{f : R_nf finite} w_f * R_nf``; NaN where no entry of row n is finite
    (the sample is unscorable). ``rewards_NF`` holds NaN (or +-inf) where a source returned None
    or a non-finite value, so a source that does not apply to a sample is skipped, not zeroed.

    >>> rewards_NF = torch.tensor([[1.0, 2.0], [float("nan"), 4.0], [float("nan"), float("inf")]])
    >>> combine_rewards(rewards_NF, torch.tensor([1.0, 0.5])).tolist()
    [2.0, 2.0, nan]
    """
    if rewards_NF.dim() != 2 or weights_F.shape != rewards_NF.shape[1:]:
        raise ValueError(
            f"combine_rewards: expected rewards (N, F) and weights (F,), got "
            f"{tuple(rewards_NF.shape)} and {tuple(weights_F.shape)}"
        )
    finite_NF = torch.isfinite(rewards_NF)
    weighted_NF = rewards_NF * weights_F.to(rewards_NF.dtype)
    scores_N = torch.where(finite_NF, weighted_NF, torch.zeros_like(weighted_NF)).sum(dim=1)
    return torch.where(finite_NF.any(dim=1), scores_N, torch.full_like(scores_N, float("nan")))


def apply_missing_eos_penalty(scores_N: Tensor, truncated_N: Tensor, penalty: float) -> Tensor:
    """``scores_N - penalty`` where the completion ended without EOS (``truncated_N`` True).

    NaN (unscorable) stays NaN; ``penalty == 0`` returns an unchanged copy. TRL's
    ``missing_eos_penalty``; the TL;DR recipe uses 1.0.
    """
    if scores_N.shape != truncated_N.shape:
        raise ValueError(
            f"apply_missing_eos_penalty: scores {tuple(scores_N.shape)} and truncated "
            f"{tuple(truncated_N.shape)} must have the same shape"
        )
    return scores_N - penalty * truncated_N.bool().to(scores_N.dtype)


def kl_penalty(
    old_logprobs_BT: Tensor, ref_logprobs_BT: Tensor, mask_BT: Tensor, estimator: str = "k1"
) -> Tensor:
    """Sequence-level KL(pi_old || pi_ref) estimate, summed over completion tokens: ``kl_B``.

    With ``d_t = log pi_ref(y_t) - log pi_old(y_t)`` on the sampled tokens:
      k1: ``kl_i = sum_t -d_t``                 (unbiased; the paper's and TRL's choice)
      k3: ``kl_i = sum_t exp(d_t) - d_t - 1``   (unbiased, >= 0, lower variance; Schulman's k3)
    The reward used for advantages is ``r_i = s_i - beta * kl_i`` (Ahmadian et al. 2024).
    """
    if not old_logprobs_BT.shape == ref_logprobs_BT.shape == mask_BT.shape:
        raise ValueError(
            f"kl_penalty: old_logprobs {tuple(old_logprobs_BT.shape)}, ref_logprobs "
            f"{tuple(ref_logprobs_BT.shape)} and mask {tuple(mask_BT.shape)} must match"
        )
    dtype = _compute_dtype(old_logprobs_BT)
    log_ratio_BT = ref_logprobs_BT.to(dtype) - old_logprobs_BT.to(dtype)
    if estimator == "k1":
        kl_BT = -log_ratio_BT
    elif estimator == "k3":
        # expm1 keeps precision when ref ~ old, where exp(d) - 1 would cancel.
        kl_BT = torch.expm1(log_ratio_BT) - log_ratio_BT
    else:
        raise ValueError(f"kl_penalty: unknown kl estimator {estimator!r}; expected 'k1' or 'k3'")
    return _masked_sum_T(kl_BT, mask_BT)


def rloo_advantages(rewards_PK: Tensor) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024): ``advantages_PK``.

    Per prompt row, over the scorable siblings S (finite entries; NaN/inf = unscorable):
      ``b_i = (sum_{j in S, j != i} r_j) / (|S| - 1)``,  ``A_i = r_i - b_i``
    which equals ``|S|/(|S|-1) * (r_i - mean_S r)``. Unscorable entries, and every entry of a
    row with |S| < 2 (no sibling to compare with), get A = 0, so they add no gradient.

    >>> rloo_advantages(torch.tensor([[1.0, float("nan"), 3.0, 5.0]])).tolist()
    [[-3.0, 0.0, 0.0, 3.0]]
    """
    if rewards_PK.dim() != 2 or not rewards_PK.is_floating_point():
        raise ValueError(
            f"rloo_advantages: expected float rewards of shape (P, K), got "
            f"{rewards_PK.dtype} {tuple(rewards_PK.shape)}"
        )
    scorable_PK = torch.isfinite(rewards_PK)
    zeros_PK = torch.zeros_like(rewards_PK)
    clean_PK = torch.where(scorable_PK, rewards_PK, zeros_PK)
    num_scorable_P1 = scorable_PK.sum(dim=1, keepdim=True)
    total_P1 = clean_PK.sum(dim=1, keepdim=True)
    # clamp only avoids 0/0 in rows with |S| < 2; those rows are zeroed just below.
    baseline_PK = (total_P1 - clean_PK) / (num_scorable_P1 - 1).clamp(min=1).to(rewards_PK.dtype)
    keep_PK = scorable_PK & (num_scorable_P1 >= 2)
    return torch.where(keep_PK, clean_PK - baseline_PK, zeros_PK)


def normalize_advantages(advantages_B: Tensor, eps: float = 1e-4) -> Tensor:
    """``(A - mean(A)) / (std(A) + eps)`` over the whole batch (TRL's ``normalize_advantages``).

    std is the unbiased (Bessel-corrected) one, as torch and TRL compute it; a batch of one
    sequence has no spread and returns zeros.
    """
    centered_B = advantages_B - advantages_B.mean()
    if advantages_B.numel() < 2:
        return centered_B
    return centered_B / (advantages_B.std() + eps)


def policy_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_B: Tensor,
    mask_BT: Tensor,
    num_sequences: int,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped sequence-level policy-gradient loss of one micro-batch: ``(loss, metrics)``.

    ``rho_i = exp(sum_t log pi_theta(y_t) - sum_t log pi_old(y_t))`` (one ratio per sequence,
    real tokens only), and
      ``L = -(1/N) sum_i min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)``
    with N = ``num_sequences`` of the WHOLE optimizer step, so summing the losses of the
    micro-batches equals the loss of one big batch. With rho = 1 (one update per generation) this
    is REINFORCE with the leave-one-out baseline (Ahmadian et al. 2024) and the loss value is
    ~0 by construction. Metrics (detached, this micro-batch): ``clip_ratio``, the fraction of
    sequences whose clipped term was the active min, and ``ratio_mean``.
    """
    if not logprobs_BT.shape == old_logprobs_BT.shape == mask_BT.shape:
        raise ValueError(
            f"policy_loss: logprobs {tuple(logprobs_BT.shape)}, old_logprobs "
            f"{tuple(old_logprobs_BT.shape)} and mask {tuple(mask_BT.shape)} must match"
        )
    if advantages_B.shape != logprobs_BT.shape[:1]:
        raise ValueError(
            f"policy_loss: advantages {tuple(advantages_B.shape)} must be (B,) = "
            f"{tuple(logprobs_BT.shape[:1])}"
        )
    if num_sequences < 1:
        raise ValueError(f"policy_loss: num_sequences must be >= 1, got {num_sequences}")
    dtype = _compute_dtype(logprobs_BT)
    # Token-wise difference before the sum: two long sums would cancel less precisely.
    log_ratio_B = _masked_sum_T(logprobs_BT.to(dtype) - old_logprobs_BT.to(dtype), mask_BT)
    ratio_B = torch.exp(log_ratio_B.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    advantages_B = advantages_B.to(dtype)
    unclipped_B = ratio_B * advantages_B
    clipped_B = torch.clamp(ratio_B, 1.0 - epsilon_low, 1.0 + epsilon_high) * advantages_B
    loss = -torch.minimum(unclipped_B, clipped_B).sum() / num_sequences
    metrics = {
        "clip_ratio": (clipped_B < unclipped_B).to(dtype).mean().detach(),
        "ratio_mean": ratio_B.mean().detach(),
    }
    return loss, metrics

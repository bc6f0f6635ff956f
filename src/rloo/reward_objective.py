"""The Bradley-Terry reward-model loss, as TRL's RewardTrainer computes it:

    loss = mean over pairs of  -log sigmoid(r_chosen - r_rejected - margin)
           + center_rewards_coefficient * mean((r_chosen + r_rejected)^2)

(the margin only where the dataset has that column; the centering term, Eisenstein et al. 2023, keeps the
scores near 0). ``r`` is the sequence classifier's one logit, read by transformers at each row's last token
that is not padding; a micro-batch holds its chosen sequences, then its rejected ones, right padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rloo.data import right_pad


def pair_scores(model, chosen_ids: list[list[int]], rejected_ids: list[list[int]], pad_token_id: int,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected): one forward over the chosen rows and the rejected rows together."""
    ids_BT, mask_BT = right_pad(chosen_ids + rejected_ids, pad_token_id)
    if device is not None:
        ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
    scores = model(input_ids=ids_BT, attention_mask=mask_BT).logits.squeeze(-1).float()
    return scores[: len(chosen_ids)], scores[len(chosen_ids):]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> torch.Tensor:
    gap = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(gap).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[float, float]:
    """Share of pairs whose chosen scores strictly higher (a tie counts as wrong, as in TRL), and its standard
    error sqrt(p (1 - p) / n)."""
    correct = (r_chosen > r_rejected).float()
    n = correct.numel()
    p = correct.mean().item() if n else float("nan")
    return p, (p * (1 - p) / n) ** 0.5 if n else float("nan")

"""Centering a trained reward model on reference completions, the N+ recipe (Huang et al. 2024, *The N+
Implementation Details of RLHF with PPO*: after training, the reward model's mean score on the SFT data's
reference summaries is subtracted, so that a reference summary scores 0 on average).

The mean score ``m`` of prompt + reference completion (+ EOS, tokenized as training pairs are) is folded into
the weights, so the folder scores centered wherever it is loaded, transformers' AutoModelForSequenceClassification
included: into the score head's bias when it has one, else into the bias of the last normalization layer before
it (the score is ``w . y``; adding ``delta = -m w / |w|^2`` to ``y`` lowers every score by ``m``: GPTNeoX /
Pythia, GPT-2, OPT, Phi). The shift is checked by scoring again and undone if it is not exact. Llama, Qwen,
Mistral and Gemma heads have no bias anywhere after the last layer: their centering is TRL's
``center_rewards_coefficient`` (during training), and this one says so.
"""

from __future__ import annotations

import torch

from rloo.preference_data import side_ids
from rloo.reward_objective import pair_scores


_NO_BIAS = ("center_rewards_dataset: {} has no bias after its last layer that holds the offset exactly (Llama, Qwen, "
            "Mistral and Gemma heads have none); use center_rewards_coefficient (TRL's centering during training) instead")


def reference_sequences(rows, tokenizer, max_length: int | None, eos: str) -> list[list[int]]:
    """``prompt + completion`` of each {prompt, completion} row (messages or strings), as a training pair's chosen
    side is tokenized; rows over ``max_length`` are left out."""
    rows = list(rows)
    if not rows or "completion" not in rows[0]:
        raise ValueError(f"center_rewards_dataset: rows need 'prompt' and 'completion' (the reference completions); "
                         f"row 0 has {sorted(rows[0]) if rows else 'nothing'}")
    conversational = isinstance(rows[0]["completion"], list)
    sequences = [side_ids(tokenizer, row, "completion", conversational, eos, i) for i, row in enumerate(rows)]
    return [s for s in sequences if max_length is None or len(s) <= max_length]


@torch.no_grad()
def scores(model, sequences: list[list[int]], pad_token_id: int, device, batch_size: int) -> torch.Tensor:
    model.eval()
    parts = [pair_scores(model, sequences[i:i + batch_size], [], pad_token_id, device)[0].double().cpu()
             for i in range(0, len(sequences), batch_size)]
    return torch.cat(parts)


def score_head(model) -> torch.nn.Linear:
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(f"center_rewards_dataset: {type(model).__name__} has no one-label linear score head to center")
    return head


def carrier(model) -> torch.nn.Parameter:
    """Where the offset goes: the head's bias, else the last norm's bias of the head's width. Raises ValueError
    where there is none (said before training, not after)."""
    head = score_head(model)
    if head.bias is not None:
        return head.bias
    norms = [m for name, m in model.named_modules() if "norm" in type(m).__name__.lower() or name.endswith(("ln_f", "norm"))]
    for norm in reversed(norms):
        if isinstance(getattr(norm, "bias", None), torch.nn.Parameter) and norm.bias.shape == (head.in_features,):
            return norm.bias
    raise ValueError(_NO_BIAS.format(type(model).__name__))


@torch.no_grad()
def center(model, sequences: list[list[int]], pad_token_id: int, device, batch_size: int) -> dict:
    """Lower every score by the mean score of ``sequences``; returns {"reference_mean_before", "reference_mean_after",
    "num_rows"}. Raises ValueError (the model unchanged) where the weights cannot hold the offset exactly."""
    if not sequences:
        raise ValueError("center_rewards_dataset: no reference row fits max_length")
    before = scores(model, sequences, pad_token_id, device, batch_size)
    mean = before.mean().item()
    head, bias = score_head(model), carrier(model)
    saved = bias.detach().clone()
    if bias is head.bias:
        bias -= mean
    else:
        weight = head.weight[0].float()
        bias += (-mean * weight / weight.dot(weight)).to(bias.dtype)
    after = scores(model, sequences, pad_token_id, device, batch_size)
    tolerance = max(1e-4, 8 * torch.finfo(bias.dtype).eps) * max(1.0, before.abs().max().item())
    if not torch.allclose(after, before - mean, atol=tolerance, rtol=0):
        bias.copy_(saved)
        raise ValueError(_NO_BIAS.format(type(model).__name__))
    return {"reference_mean_before": mean, "reference_mean_after": after.mean().item(), "num_rows": len(sequences)}

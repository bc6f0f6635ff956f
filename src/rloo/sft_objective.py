"""The supervised loss: the mean negative log-likelihood of the trained tokens over an optimizer step, as
TRL's SFTTrainer computes it (``loss_type nll``):

    loss = - sum_{rows, t : mask_t = 1} log pi(x_t | x_<t)  /  N

with N the number of trained tokens in the whole optimizer step (every micro-batch, every process), so
gradient accumulation and several processes give the gradient of one large batch, and a long sequence
weighs by its tokens. Each micro-batch's ``sft_loss`` is its own sum over that same N; under DDP, which
averages gradients over processes, the loop multiplies by the number of processes.

The log-probs come from ``completion_logprobs`` (the memory-light log-softmax, chunked from the final
hidden states where the model allows): each row is cut before its first trained token, the part before it
runs as a left-padded prompt (no logits are computed there: on TL;DR rows, a post of ~350 tokens and a
summary of ~35, that is most of the output layer's work saved) and the rest as the completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rloo.data import left_pad, right_pad
from rloo.logprobs import completion_logprobs
from rloo.sft_data import SFTExample


@dataclass
class SFTBatch:
    head_ids_PL: torch.Tensor  # each row's tokens before its first trained one, left padded
    head_mask_PL: torch.Tensor
    rest_ids_BT: torch.Tensor  # the tokens from there on, right padded
    rest_mask_BT: torch.Tensor  # 1 on real tokens
    loss_mask_BT: torch.Tensor  # 1 on trained tokens (float)

    def to(self, device) -> "SFTBatch":
        return SFTBatch(*(t.to(device) for t in (self.head_ids_PL, self.head_mask_PL, self.rest_ids_BT,
                                                  self.rest_mask_BT, self.loss_mask_BT)))

    @property
    def num_trained_tokens(self) -> int:
        return int(self.loss_mask_BT.sum().item())


def sft_batch(examples: list[SFTExample], pad_token_id: int) -> SFTBatch:
    cuts = [next((t for t, trained in enumerate(e.loss_mask) if trained and t > 0), 1) for e in examples]
    head_ids_PL, head_mask_PL = left_pad([e.input_ids[:cut] for e, cut in zip(examples, cuts)], pad_token_id)
    rest_ids_BT, rest_mask_BT = right_pad([e.input_ids[cut:] for e, cut in zip(examples, cuts)], pad_token_id)
    loss_mask_BT, _ = right_pad([e.loss_mask[cut:] for e, cut in zip(examples, cuts)], 0)
    return SFTBatch(head_ids_PL, head_mask_PL, rest_ids_BT, rest_mask_BT, loss_mask_BT.float())


def sft_loss(model, batch: SFTBatch, num_items: int, with_entropy: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This micro-batch's share of the step's loss: its trained tokens' negative log-likelihood summed, over
    ``num_items`` (the step's trained tokens); and, if asked, the per-token entropy (detached)."""
    logprobs_BT, entropy_BT = completion_logprobs(model, batch.head_ids_PL, batch.head_mask_PL, batch.rest_ids_BT,
                                                  batch.rest_mask_BT, with_entropy=with_entropy)
    loss = -(logprobs_BT * batch.loss_mask_BT).sum() / max(num_items, 1)
    return loss, entropy_BT

"""The supervised loss: the mean negative log-likelihood of the trained tokens over an optimizer step, as
TRL's SFTTrainer computes it (``loss_type nll``):

    loss = - sum_{rows, t : mask_t = 1} log pi(x_t | x_<t)  /  N

with N the number of trained tokens in the whole optimizer step (every micro-batch, every process), so
gradient accumulation and several processes give the gradient of one large batch, and a long sequence
weighs by its tokens. Each micro-batch's ``sft_loss`` is its own sum over that same N; under DDP, which
averages gradients over processes, the loop multiplies by the number of processes.

The log-probs come from ``completion_logprobs`` (the memory-light log-softmax, chunked from the final
hidden states where the model allows): each row's first token is its "prompt", the rest its completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rloo.data import right_pad
from rloo.logprobs import completion_logprobs
from rloo.sft_data import SFTExample


@dataclass
class SFTBatch:
    first_ids_P1: torch.Tensor  # each row's first token (nothing predicts it)
    first_mask_P1: torch.Tensor
    rest_ids_BT: torch.Tensor  # the tokens after it, right padded
    rest_mask_BT: torch.Tensor  # 1 on real tokens
    loss_mask_BT: torch.Tensor  # 1 on trained tokens (float)

    def to(self, device) -> "SFTBatch":
        return SFTBatch(*(t.to(device) for t in (self.first_ids_P1, self.first_mask_P1, self.rest_ids_BT,
                                                  self.rest_mask_BT, self.loss_mask_BT)))

    @property
    def num_trained_tokens(self) -> int:
        return int(self.loss_mask_BT.sum().item())


def sft_batch(examples: list[SFTExample], pad_token_id: int) -> SFTBatch:
    first = torch.tensor([[e.input_ids[0]] for e in examples])
    rest_ids_BT, rest_mask_BT = right_pad([e.input_ids[1:] for e in examples], pad_token_id)
    loss_mask_BT, _ = right_pad([e.loss_mask[1:] for e in examples], 0)
    return SFTBatch(first, torch.ones_like(first), rest_ids_BT, rest_mask_BT, loss_mask_BT.float())


def sft_loss(model, batch: SFTBatch, num_items: int, with_entropy: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This micro-batch's share of the step's loss: its trained tokens' negative log-likelihood summed, over
    ``num_items`` (the step's trained tokens); and, if asked, the per-token entropy (detached)."""
    logprobs_BT, entropy_BT = completion_logprobs(model, batch.first_ids_P1, batch.first_mask_P1, batch.rest_ids_BT,
                                                  batch.rest_mask_BT, with_entropy=with_entropy)
    loss = -(logprobs_BT * batch.loss_mask_BT).sum() / max(num_items, 1)
    return loss, entropy_BT

"""Sampling on the training model itself (no weight copy needed), with transformers.

Two paths with the same sampling distribution (transformers' own temperature / top-k / top-p warpers,
then one multinomial draw per row and token, as ``generate`` does):

- ``share_prompt=True`` (default): each of the P distinct prompts is prefilled once, its KV cache
  is repeated k times, and the P * k rows are decoded in a lean loop (DESIGN.md §3);
- ``share_prompt=False``: ``model.generate`` on the prompts repeated k times.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from rloo.data import left_pad
from rloo.generation import Completions, cut_at_eos
from rloo.models import prefill_shared


class HFGenerator:
    def __init__(self, model, *, pad_token_id: int, eos_token_ids: list[int], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, do_sample: bool = True,
                 share_prompt: bool = True):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.share_prompt = share_prompt
        # An explicit config, so nothing from the checkpoint's generation_config.json (repetition
        # penalty, min length...) silently changes the sampling distribution the objective assumes.
        self.generation_config = GenerationConfig(
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=top_k if do_sample else None,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_ids,
            pad_token_id=pad_token_id,
            use_cache=True,
        )
        # The warpers generate applies, in its order (temperature, top-k, top-p).
        self.warpers = LogitsProcessorList()
        if do_sample and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if do_sample and top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if do_sample and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_generations: int) -> Completions:
        device = next(self.model.parameters()).device
        prompt_ids_PL, prompt_mask_PL = left_pad(prompt_ids, self.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        try:
            if self.share_prompt:
                sequences_BT = self._shared_prefill_decode(prompt_ids_PL.to(device), prompt_mask_PL.to(device),
                                                           num_generations)
            else:
                # Rows of one prompt adjacent, as num_return_sequences would lay them out (which greedy refuses).
                sequences_BT = self.model.generate(
                    input_ids=prompt_ids_PL.repeat_interleave(num_generations, 0).to(device),
                    attention_mask=prompt_mask_PL.repeat_interleave(num_generations, 0).to(device),
                    generation_config=self.generation_config,
                )[:, prompt_ids_PL.shape[1]:]
        finally:
            self.model.train(was_training)
        return cut_at_eos(sequences_BT, self.eos_token_ids, self.pad_token_id)

    def _shared_prefill_decode(self, prompt_ids_PL: torch.Tensor, prompt_mask_PL: torch.Tensor, k: int) -> torch.Tensor:
        """Prefill P prompts once, repeat the KV cache k times, decode B = P * k rows token by token."""
        prefill = prefill_shared(self.model, prompt_ids_PL, prompt_mask_PL, k)
        cache, logits_BV = prefill.cache, prefill.last_logits_BV.float()
        attention_mask, position_B = prefill.attention_mask_BL, prefill.next_position_B
        eos_E = torch.tensor(self.eos_token_ids, device=logits_BV.device)
        unfinished_B = torch.ones(logits_BV.shape[0], dtype=torch.bool, device=logits_BV.device)
        tokens = []
        for step in range(self.max_new_tokens):
            if self.do_sample:
                probs_BV = self.warpers(None, logits_BV).softmax(-1)
                next_B = torch.multinomial(probs_BV, num_samples=1).squeeze(1)
            else:
                next_B = logits_BV.argmax(-1)
            next_B = torch.where(unfinished_B, next_B, self.pad_token_id)
            tokens.append(next_B)
            unfinished_B &= ~torch.isin(next_B, eos_E)
            if not unfinished_B.any() or step == self.max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            out = self.model(input_ids=next_B[:, None], attention_mask=attention_mask, position_ids=position_B[:, None],
                             past_key_values=cache, use_cache=True)
            cache, logits_BV, position_B = out.past_key_values, out.logits[:, -1].float(), position_B + 1
        return torch.stack(tokens, dim=1)

    def load_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: this backend samples from the training model itself."""

"""Sampling with transformers' ``generate`` on the training model itself (no weight copy needed)."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from rloo.data import left_pad
from rloo.generation import Completions, cut_at_eos


class HFGenerator:
    def __init__(self, model, *, pad_token_id: int, eos_token_ids: list[int], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, do_sample: bool = True):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
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

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_generations: int) -> Completions:
        device = next(self.model.parameters()).device
        prompt_ids_PL, prompt_mask_PL = left_pad(prompt_ids, self.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        # Rows of one prompt adjacent, as generate's num_return_sequences would lay them out (which greedy refuses).
        input_ids = prompt_ids_PL.repeat_interleave(num_generations, 0).to(device)
        attention_mask = prompt_mask_PL.repeat_interleave(num_generations, 0).to(device)
        try:
            sequences = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
            )
        finally:
            self.model.train(was_training)
        return cut_at_eos(sequences[:, prompt_ids_PL.shape[1]:], self.eos_token_ids, self.pad_token_id)

    def load_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: this backend samples from the training model itself."""

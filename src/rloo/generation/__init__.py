"""Generation backends behind one small protocol; ``build_generator`` is the only place that picks one.

The trainer calls ``generator.generate(prompt_ids, k, seeds)`` and, before generating with weights that
changed since, ``generator.load_weights(model)``; it never branches on the backend. ``seeds`` (one per prompt) make
a prompt's k samples a function of its seed alone: the same whatever else is in the batch and however
many processes share the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Completions:
    """k completions per prompt, rows of one prompt adjacent (B = P * k)."""

    completion_ids_BT: torch.Tensor  # long, right padded; tokens up to and including the first EOS
    completion_mask_BT: torch.Tensor  # long, 1 on real tokens (EOS included), 0 on padding
    truncated_B: torch.Tensor  # bool, True where no EOS came within max_completion_length
    sampler_logprobs_BT: torch.Tensor | None = None  # float, the sampler's log-prob of each token (temperature applied); 0 on padding


class Generator(Protocol):
    def generate(self, prompt_ids: list[list[int]], num_generations: int,
                 seeds: list[int] | None = None) -> Completions: ...

    def load_weights(self, model: torch.nn.Module) -> None: ...

    def close(self) -> None: ...


def cut_at_eos(sequences_BT: torch.Tensor, eos_token_ids: list[int], pad_token_id: int) -> Completions:
    """Keep each row up to and including its first EOS; pad and mask everything after it."""
    is_eos_BT = torch.isin(sequences_BT, torch.tensor(eos_token_ids, device=sequences_BT.device))
    has_eos_B = is_eos_BT.any(1)
    num_tokens = sequences_BT.shape[1]
    first_eos_B = torch.where(has_eos_B, is_eos_BT.int().argmax(1), num_tokens)
    positions_T = torch.arange(num_tokens, device=sequences_BT.device)
    mask_BT = (positions_T[None, :] <= first_eos_B[:, None]).long()
    ids_BT = sequences_BT.masked_fill(mask_BT == 0, pad_token_id)
    return Completions(ids_BT, mask_BT, ~has_eos_B)


def prompt_seeds(seed: int, step: int, rows: list[int]) -> list[int]:
    """One sampling seed per prompt: a function of the run's seed, the step and the dataset row only."""
    return [(seed * 1_000_003 + step) * 1_000_033 + row for row in rows]


def build_generator(cfg, model, tokenizer, eos_token_ids: list[int], all_done=None, dtype=None) -> Generator:
    """The generation backend for ``cfg``: the training model itself (transformers), or vLLM colocated
    or behind ``rloo vllm-serve`` (``use_vllm``, ``vllm_mode``). ``all_done(done_here) -> bool``: given
    when the processes must decode in step (distributed.lockstep). ``dtype``: the compute dtype, which a
    vLLM engine holds the weights in."""
    if cfg.use_vllm:
        from rloo.generation.vllm import build_vllm_generator

        return build_vllm_generator(cfg, model, tokenizer, eos_token_ids, dtype)
    from rloo.generation.hf import HFGenerator

    return HFGenerator(
        model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=eos_token_ids,
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty,
        share_prompt=cfg.share_prompt_prefix,
        all_done=all_done,
    )

"""Sampling on the training model itself (no weight copy needed), with transformers models.

A lean decode loop instead of ``model.generate`` (whose per-token overhead dominates for small models):
transformers' own repetition-penalty, temperature, top-k, top-p and min-p processors in generate's
order, then one categorical draw per row and token (``sample_categorical``). ``share_prompt=True``
(default) prefills each of the P distinct prompts once and repeats its cache k times (DESIGN.md §3);
``share_prompt=False`` prefills the prompts repeated k times. Both sample the same tokens for the same
seed (a test), and greedy decoding gives exactly a plain no-cache loop's tokens on every architecture
the tests build (full and sliding-window attention, ALiBi, state-space and hybrid models).

The prefill takes the 2D padding mask, from which transformers builds each layer's own mask (a
sliding window, ALiBi, a recurrent layer's padding); the cache it returns is repeated with its own
``reorder_cache``, except that full-attention layers go into a buffer with room for the completion
(``ReservedCacheLayer``), written in place at each decode step.
"""

from __future__ import annotations

from typing import Callable

import torch
from dataclasses import dataclass
from typing import Any

from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from rloo.architecture import architecture, cache_of, forward_kwargs
from rloo.data import left_pad
from rloo.generation import Completions, cut_at_eos


class HFGenerator:
    def __init__(self, model, *, pad_token_id: int, eos_token_ids: list[int], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float | None = None,
                 repetition_penalty: float = 1.0, do_sample: bool = True, share_prompt: bool = True,
                 all_done: Callable[[bool], bool] | None = None):
        self.model = model
        # Several processes over a sharded policy whose weights are not gathered: each forward is a collective,
        # so every process decodes until all are done (distributed.lockstep).
        self.all_done = all_done
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature if do_sample else 1.0
        self.share_prompt = share_prompt
        # The processors generate applies, in its order (repetition penalty, then the warpers temperature,
        # top-k, top-p, min-p), only those the config names: nothing is read from the checkpoint's
        # generation_config.json, which would silently change the sampling distribution.
        self.warpers = LogitsProcessorList()
        self.repetition = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None
        if do_sample and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if do_sample and top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if do_sample and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        if do_sample and min_p:
            self.warpers.append(MinPLogitsWarper(min_p))

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int] | None = None) -> Completions:
        device = next(self.model.parameters()).device
        prompt_ids_PL, prompt_mask_PL = left_pad(prompt_ids, self.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        try:
            prompt_ids_PL, prompt_mask_PL = prompt_ids_PL.to(device), prompt_mask_PL.to(device)
            if self.share_prompt:
                prefill = prefill_shared(self.model, prompt_ids_PL, prompt_mask_PL, num_generations,
                                         reserve=self.max_new_tokens)
            else:  # each prompt k times, rows of one prompt adjacent, as num_return_sequences lays them out
                prefill = prefill_shared(self.model, prompt_ids_PL.repeat_interleave(num_generations, 0),
                                         prompt_mask_PL.repeat_interleave(num_generations, 0), 1,
                                         reserve=self.max_new_tokens)
            prefill.prompt_ids_BL = prompt_ids_PL.repeat_interleave(num_generations, 0)
            generators = None
            if seeds is not None:  # each prompt's k rows draw their noise from the prompt's own generator
                generators = [torch.Generator(device).manual_seed(seed % 2**63) for seed in seeds]
            sequences_BT, logprobs_BT = self._decode(prefill, generators)
        finally:
            self.model.train(was_training)
        completions = cut_at_eos(sequences_BT, self.eos_token_ids, self.pad_token_id)
        completions.sampler_logprobs_BT = logprobs_BT * completions.completion_mask_BT
        return completions

    def _decode(self, prefill: SharedPrefill, generators: list[torch.Generator] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the B prefilled rows token by token, until every row has emitted an EOS or the limit. Also
        returns each token's log-prob under the decode loop's own logits (temperature applied, as the training
        passes compute it): the metric ``sampling_logprob_gap`` compares the two."""
        arch = architecture(self.model)
        cache, logits_BV = prefill.cache, prefill.last_logits_BV.float()
        attention_mask, position_B = prefill.attention_mask_BL, prefill.next_position_B
        eos_E = torch.tensor(self.eos_token_ids, device=logits_BV.device)
        unfinished_B = torch.ones(logits_BV.shape[0], dtype=torch.bool, device=logits_BV.device)
        tokens, logprobs = [], []
        if self.repetition is not None:  # padding as a copy of the row's last prompt token: no token of its own
            last_B1 = prefill.prompt_ids_BL[:, -1:]  # left padding: always a real token
            seen_prompt_BL = torch.where(prefill.attention_mask_BL.bool(), prefill.prompt_ids_BL, last_B1)
        for step in range(self.max_new_tokens):
            model_logits_BV = logits_BV / self.temperature if self.temperature != 1.0 else logits_BV  # processors copy
            if self.repetition is not None:  # over the real prompt tokens and the completion so far
                logits_BV = self.repetition(torch.cat([seen_prompt_BL, *[t[:, None] for t in tokens]], 1), logits_BV)
            if self.do_sample:
                next_B = sample_categorical(self.warpers(None, logits_BV).softmax(-1), generators)
            else:
                next_B = logits_BV.argmax(-1)
            next_B = torch.where(unfinished_B, next_B, self.pad_token_id)
            tokens.append(next_B)
            logprobs.append(model_logits_BV.gather(-1, next_B[:, None])[:, 0] - model_logits_BV.logsumexp(-1))
            unfinished_B &= ~torch.isin(next_B, eos_E)
            done = not unfinished_B.any()
            if self.all_done is not None:
                done = self.all_done(done)
            if done or step == self.max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            out = self.model(input_ids=next_B[:, None], use_cache=True,
                             **forward_kwargs(arch, attention_mask, position_B[:, None], cache, decoding=True))
            cache, logits_BV, position_B = cache_of(out), out.logits[:, -1].float(), position_B + 1
        return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)

    def load_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: this backend samples from the training model itself."""

    def close(self) -> None:
        """Nothing to release."""


def sample_categorical(probs_BV: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One draw per row from the categorical distribution ``probs_BV`` (rows need not sum to 1).

    The exponential race ``torch.multinomial(probs, 1)`` runs: argmax_i p_i / E_i with E_i ~ Exp(1)
    independent, which picks i with probability p_i / sum(p); a token of probability 0 never wins.
    E = -log(U) from ``torch.rand``: on CPU, multinomial's ``exponential_`` is about 5x slower (the
    noise costs more than the decode step of a small model). Unlike an inverse-CDF draw, a tiny change
    in the logits (another batch shape) changes the token only at near-ties. U has 24 bits, so a
    token whose probability is below about 1e-7 of the top token's is drawn a little less often.
    ``generators``: one per equal block of consecutive rows (a prompt's k rows), else the global RNG.
    """
    if generators is None:
        uniform_BV = torch.rand(probs_BV.shape, device=probs_BV.device)
    else:
        rows = probs_BV.shape[0] // len(generators)
        uniform_BV = torch.cat([torch.rand((rows, probs_BV.shape[1]), generator=g, device=probs_BV.device)
                                for g in generators])
    noise_BV = uniform_BV.log_().neg_()  # Exp(1); U = 0 -> inf -> loses
    return (probs_BV.float() / noise_BV).argmax(-1)


@dataclass
class SharedPrefill:
    """For generation: P prompts run once, their state repeated for k completions each (B = P * k rows)."""

    cache: Any  # the model's cache, batch repeated k times
    last_logits_BV: torch.Tensor  # logits at each prompt's last token: they predict completion token 0
    attention_mask_BL: torch.Tensor  # the prompt mask, repeated k times
    next_position_B: torch.Tensor  # each prompt's own length: where its completions' positions start
    prompt_ids_BL: torch.Tensor | None = None  # the prompts, repeated k times (repetition penalty)


def prefill_shared(model, prompt_ids_PL: torch.Tensor, prompt_mask_PL: torch.Tensor, k: int,
                   reserve: int = 0) -> SharedPrefill:
    """For generation: run each left-padded prompt once and repeat its cache k times (DESIGN.md §3),
    full-attention layers into buffers with room for ``reserve`` more tokens (``ReservedCacheLayer``)."""
    arch = architecture(model)
    positions_PL = (prompt_mask_PL.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids_PL, use_cache=True, logits_to_keep=1,
                **forward_kwargs(arch, prompt_mask_PL, positions_PL))
    cache = cache_of(out)
    if reserve > 0:
        cache.layers = [ReservedCacheLayer(layer.keys, layer.values, k, reserve) if type(layer) is DynamicLayer
                        and layer.is_initialized else layer for layer in cache.layers]
    if k > 1:
        index_B = torch.arange(prompt_ids_PL.shape[0], device=prompt_ids_PL.device).repeat_interleave(k)
        for layer in cache.layers:
            if not isinstance(layer, ReservedCacheLayer):
                layer.reorder_cache(index_B)
    attention_mask_BL = prompt_mask_PL.repeat_interleave(k, 0)
    # Positions continue after each prompt's own length, not the padded width.
    return SharedPrefill(cache, out.logits[:, -1].repeat_interleave(k, 0), attention_mask_BL, attention_mask_BL.sum(1))


class ReservedCacheLayer(DynamicLayer):
    """transformers' DynamicLayer, batch repeated k times, in a buffer with room for ``reserve`` more
    tokens: each decode step writes its keys/values in place, where DynamicLayer would concatenate
    (copying the whole cache every token, most of the decode time for short completions of long prompts)."""

    def __init__(self, keys_PHLD: torch.Tensor, values_PHLD: torch.Tensor, k: int, reserve: int):
        super().__init__()
        num_prompts, heads, length, _ = keys_PHLD.shape
        self._keys = keys_PHLD.new_empty(num_prompts, k, heads, length + reserve, keys_PHLD.shape[-1])
        self._values = values_PHLD.new_empty(num_prompts, k, heads, length + reserve, values_PHLD.shape[-1])
        self._keys[:, :, :, :length] = keys_PHLD[:, None]
        self._values[:, :, :, :length] = values_PHLD[:, None]
        self._keys, self._values = self._keys.flatten(0, 1), self._values.flatten(0, 1)
        self.dtype, self.device, self.is_initialized, self.length = keys_PHLD.dtype, keys_PHLD.device, True, length
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[2]:
            raise ValueError(f"ReservedCacheLayer: {end} tokens exceed the {self._keys.shape[2]} reserved")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

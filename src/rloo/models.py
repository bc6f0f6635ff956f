"""Policy / reference loading and per-token log-probs of completions given their prompts.

Batches stay grouped: ``prompt_ids_PL`` holds each of the P distinct prompts once and
``completion_ids_BT`` its k completions (B = P * k, rows of one prompt adjacent), so the log-prob pass
runs each prompt once and shares it with its k completions (DESIGN.md §3); so does generation's
prefill (``prefill_shared``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from rloo.hub import from_pretrained

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """'rloo:tldr-tiny-sft' -> the cached folder (built on first use); anything else unchanged."""
    if name_or_path == "rloo:tldr-tiny-sft":
        from rloo.tiny import ensure_tldr_tiny_policy

        return str(ensure_tldr_tiny_policy())
    if name_or_path.startswith("rloo:"):
        raise ValueError(f"model_name_or_path: unknown built-in model '{name_or_path}' (known: rloo:tldr-tiny-sft)")
    return name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The policy tokenizer, with a pad token (EOS when the model has none, as TRL does)."""
    tokenizer = from_pretrained(AutoTokenizer, name_or_path, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of '{name_or_path}' has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(name_or_path: str, torch_dtype: str = "auto", trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM from safetensors only (no pickle), with remote code off unless asked for."""
    dtype = DTYPES.get(torch_dtype, "auto")
    model = from_pretrained(
        AutoModelForCausalLM,
        name_or_path,
        "policy model",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    return model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The reference policy: a copy of ``model`` as it is in memory now (not reloaded from disk)."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (as TRL does): with it, the training pass would not reproduce the sampling
    policy's log-probs (ratio != 1 on-policy) and the KL to an identical reference would not be 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def prompt_token_limit(model, max_prompt_length: int | None, max_completion_length: int) -> int | None:
    """Prompts keep at most this many (last) tokens: ``max_prompt_length``, lowered so that prompt +
    ``max_completion_length`` fits the model's context (``max_position_embeddings``) when it has one."""
    context = getattr(getattr(model, "module", model).config, "max_position_embeddings", None)
    if not context:
        return max_prompt_length
    room = context - max_completion_length
    if room < 1:
        raise ValueError(f"max_completion_length={max_completion_length} leaves no room for a prompt in the model's "
                         f"context of {context} tokens (max_position_embeddings)")
    return room if max_prompt_length is None else min(max_prompt_length, room)


def eos_token_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    if not ids:
        raise ValueError("the model and tokenizer define no EOS token; completions could never end")
    return sorted(ids)


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids_PL: torch.Tensor,
    prompt_mask_PL: torch.Tensor,
    completion_ids_BT: torch.Tensor,
    completion_mask_BT: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    share_prompt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log pi(y_t | x, y_<t) of each completion, logits divided by ``temperature`` as in sampling.

    Prompts are left padded (P, L); completions right padded (B, T) with B = P * k, the k rows of a
    prompt adjacent. Returns ``logprobs_BT`` (0 on padding) and, if asked, ``entropy_BT`` (detached).

    ``share_prompt`` (DESIGN.md §3): run each prompt once, then its k completions side by side in one
    row after the prompt's KV cache (``_shared_prompt_logits``). Autograd flows back through the
    shared prompt states, so log-probs and gradients equal those of the repeated computation
    (``share_prompt=False``: every prompt concatenated to each of its completions), which a test checks.
    """
    num_prompts, num_completions = prompt_ids_PL.shape[0], completion_ids_BT.shape[0]
    k = num_completions // num_prompts
    if k * num_prompts != num_completions:
        raise ValueError(f"completion_logprobs: {num_completions} completions is not a multiple of {num_prompts} prompts")
    # transformers turns the KV cache off under gradient checkpointing in training, and the completion slots
    # need a 4D mask (sdpa / eager attention): share only then.
    checkpointing = model.training and getattr(getattr(model, "module", model), "is_gradient_checkpointing", False)
    shared = share_prompt and k > 1 and not checkpointing and _takes_4d_masks(model)
    forward = _shared_prompt_logits if shared else _repeated_prompt_logits
    parts = [(selective_logprobs_from_hidden if isinstance(inputs, HiddenStates) else selective_logprobs)(
                 inputs, ids, temperature, with_entropy)
             for inputs, ids in forward(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, k)]
    logprobs_BT = torch.cat([logprobs for logprobs, _ in parts], dim=1) * completion_mask_BT
    entropy_BT = torch.cat([entropy for _, entropy in parts], dim=1) * completion_mask_BT if with_entropy else None
    return logprobs_BT, entropy_BT


def selective_logprobs(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, temperature: float = 1.0,
                       with_entropy: bool = False, rows_per_chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[id] as logit[id] - logsumexp(logits), a few rows at a time.

    No full (B, T, V) log-softmax is kept for backward (logsumexp saves only its input, the logits
    themselves when temperature is 1), and the entropy is computed without grad chunk by chunk.
    """
    logprobs, entropies = [], []
    for start in range(0, logits_BTV.shape[0], rows_per_chunk):
        logits = logits_BTV[start : start + rows_per_chunk].float()
        if temperature != 1.0:
            logits = logits / temperature
        logsumexp_BT = torch.logsumexp(logits, dim=-1)
        ids = ids_BT[start : start + rows_per_chunk].unsqueeze(-1)
        logprobs.append(logits.gather(-1, ids).squeeze(-1) - logsumexp_BT)
        if with_entropy:
            with torch.no_grad():  # H = -sum p log p = logsumexp - sum p * logit
                probs = (logits - logsumexp_BT.unsqueeze(-1)).exp()
                entropies.append(logsumexp_BT - (probs * logits).sum(-1))
    return torch.cat(logprobs), torch.cat(entropies) if with_entropy else None


def selective_logprobs_from_hidden(states: HiddenStates, ids_BT: torch.Tensor, temperature: float = 1.0,
                                   with_entropy: bool = False, rows_per_chunk: int = 4
                                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``selective_logprobs`` of ``states.head(states.hidden_BTD)`` without ever holding those logits:
    a few rows at a time, under activation checkpointing, so backward recomputes each chunk's logits
    (one more output-layer matmul) instead of keeping (B, T, V) floats from forward to backward."""
    weight, bias = states.head.weight, states.head.bias
    logprobs, entropies = [], []
    for start in range(0, ids_BT.shape[0], rows_per_chunk):
        args = (states.hidden_BTD[start : start + rows_per_chunk], ids_BT[start : start + rows_per_chunk], weight, bias)
        if torch.is_grad_enabled():
            chunk = torch.utils.checkpoint.checkpoint(_head_logprobs, *args, temperature, with_entropy,
                                                      use_reentrant=False)
        else:
            chunk = _head_logprobs(*args, temperature, with_entropy)
        logprobs.append(chunk[0])
        entropies.append(chunk[1])
    return torch.cat(logprobs), torch.cat(entropies) if with_entropy else None


def _head_logprobs(hidden_BTD, ids_BT, weight, bias, temperature, with_entropy):
    logits = torch.nn.functional.linear(hidden_BTD, weight, bias)
    logprobs, entropies = selective_logprobs(logits, ids_BT, temperature, with_entropy, rows_per_chunk=len(ids_BT))
    return logprobs, entropies


def _repeated_prompt_logits(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, k):
    """[(logits, ids)] predicting each completion token, from [prompt ; completion] rows (the prompt k times)."""
    input_ids = torch.cat([prompt_ids_PL.repeat_interleave(k, 0), completion_ids_BT], dim=1)
    attention_mask = torch.cat([prompt_mask_PL.repeat_interleave(k, 0), completion_mask_BT], dim=1)
    # Positions count real tokens only, so a left-padded prompt starts at 0 exactly as in generation.
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    num_tokens = completion_ids_BT.shape[1]
    logits_BTV = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=num_tokens + 1, use_cache=False).logits[:, :-1]
    return [(logits_BTV, completion_ids_BT)]


def attention_bias(model, allowed_BQK: torch.Tensor, mask_2d: torch.Tensor) -> torch.Tensor:
    """The attention mask to pass: an additive (B, 1, Q, K) bias in the model's dtype for sdpa / eager
    attention, which transformers uses as given, so every layer shares one tensor (from a 2D mask, each
    layer's sdpa call converts a boolean mask to a new float one and keeps it for backward: 6 x 8 MB for
    8 prompts of 512 tokens). Other attention kernels (flash-attention) get the 2D padding mask."""
    if not _takes_4d_masks(model):
        return mask_2d
    dtype = next(model.parameters()).dtype
    bias = torch.zeros(allowed_BQK.shape, dtype=dtype, device=allowed_BQK.device)
    return bias.masked_fill_(~allowed_BQK, torch.finfo(dtype).min)[:, None]


@dataclass
class SharedPrefill:
    """For generation: P prompts run once, their state repeated for k completions each (B = P * k rows)."""

    cache: Any  # the KV cache, batch repeated k times
    last_logits_BV: torch.Tensor  # logits at each prompt's last token: they predict completion token 0
    attention_mask_BL: torch.Tensor  # the prompt mask, repeated k times
    next_position_B: torch.Tensor  # each prompt's own length: where its completions' positions start


def _prompt_forward(model, prompt_ids_PL: torch.Tensor, prompt_mask_PL: torch.Tensor, **kwargs):
    """Each left-padded prompt once, positions counting its real tokens from 0; its KV cache and the
    logits at its last token (which predict completion token 0)."""
    length = prompt_ids_PL.shape[1]
    causal_LL = torch.ones(length, length, dtype=torch.bool, device=prompt_ids_PL.device).tril()
    attention_mask = attention_bias(model, causal_LL[None] & prompt_mask_PL.bool()[:, None, :], prompt_mask_PL)
    return model(input_ids=prompt_ids_PL, attention_mask=attention_mask,
                 position_ids=(prompt_mask_PL.cumsum(1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1, **kwargs)


def prefill_shared(model, prompt_ids_PL: torch.Tensor, prompt_mask_PL: torch.Tensor, k: int,
                   reserve: int = 0) -> SharedPrefill:
    """For generation: run each left-padded prompt once and repeat its KV cache k times (DESIGN.md §3),
    with room for ``reserve`` more tokens, written in place at each decode step (``ReservedCacheLayer``)."""
    out = _prompt_forward(model, prompt_ids_PL, prompt_mask_PL)
    cache = out.past_key_values
    if reserve > 0:
        cache.layers = [ReservedCacheLayer(layer.keys, layer.values, k, reserve) if type(layer) is DynamicLayer
                        else layer for layer in cache.layers]
    for layer in cache.layers:
        if not isinstance(layer, ReservedCacheLayer):
            layer.batch_repeat_interleave(k)
    attention_mask_BL = prompt_mask_PL.repeat_interleave(k, 0)
    # Positions continue after each prompt's own length, not the padded width.
    return SharedPrefill(out.past_key_values, out.logits[:, -1].repeat_interleave(k, 0), attention_mask_BL,
                         attention_mask_BL.sum(1))


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


def _shared_prompt_logits(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, k):
    """The same log-prob inputs with each prompt run once, then its k completions side by side in one row.

    Row p of the second forward holds slots [c_1 | ... | c_k] of T tokens each after prompt p's KV
    cache (not repeated); a block mask lets slot s see the prompt's real tokens and its own earlier
    tokens only, and positions restart at the prompt's length in every slot. So every completion
    token sees exactly what it sees in [prompt ; completion] rows. Token 0 is predicted by the
    prompt's last position, tokens 1..T-1 by slot positions 0..T-2. Those take the final hidden
    states to ``selective_logprobs_from_hidden`` (no (B, T, V) logits), when the model's logits are
    its output embedding applied to them (checked on the prompt's last position; else logits).
    """
    num_prompts, num_tokens = prompt_ids_PL.shape[0], completion_ids_BT.shape[1]
    device = completion_ids_BT.device
    out = _prompt_forward(model, prompt_ids_PL, prompt_mask_PL, output_hidden_states=True)
    first = (out.logits[:, -1].repeat_interleave(k, 0)[:, None], completion_ids_BT[:, :1])
    if num_tokens == 1:
        return [first]
    head = _plain_output_head(model, out.hidden_states[-1][:, -1:], out.logits[:, -1:])
    slot_token_S = torch.arange(num_tokens, device=device).repeat(k)  # S = k * T columns
    causal_TT = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).tril()
    own_slot_SS = torch.block_diag(*[causal_TT] * k)
    allowed_PSK = torch.cat([prompt_mask_PL.bool()[:, None, :].expand(-1, k * num_tokens, -1),
                             own_slot_SS[None].expand(num_prompts, -1, -1)], dim=2)
    keep_S = (torch.arange(k, device=device)[:, None] * num_tokens + torch.arange(num_tokens - 1, device=device)).flatten()
    slots_out = model(input_ids=completion_ids_BT.reshape(num_prompts, k * num_tokens),
                      attention_mask=attention_bias(model, allowed_PSK, None),
                      position_ids=prompt_mask_PL.sum(1, keepdim=True) + slot_token_S[None],
                      past_key_values=out.past_key_values, use_cache=True,
                      output_hidden_states=head is not None, logits_to_keep=1 if head is not None else keep_S)
    if head is None:
        return [first, (slots_out.logits.reshape(num_prompts * k, num_tokens - 1, -1), completion_ids_BT[:, 1:])]
    hidden_BTD = slots_out.hidden_states[-1][:, keep_S].reshape(num_prompts * k, num_tokens - 1, -1)
    return [first, (HiddenStates(hidden_BTD, head), completion_ids_BT[:, 1:])]


@dataclass
class HiddenStates:
    """Final hidden states and the output layer that turns them into logits (applied chunk by chunk)."""

    hidden_BTD: torch.Tensor
    head: torch.nn.Linear


def _plain_output_head(model, hidden_P1D: torch.Tensor, logits_P1V: torch.Tensor) -> torch.nn.Linear | None:
    """The output embedding, if the model's logits are exactly that layer applied to its final hidden
    states (not so with logit soft-capping or scaling, as Gemma 2 or Cohere do); else None."""
    root = getattr(model, "module", model)
    head = root.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.numel() != head.in_features * head.out_features:
        return None  # not a plain layer, or its weight is partitioned (ZeRO-3) outside the model's forward
    if _is_fsdp(root) or _is_fsdp(head):
        return None  # FSDP reduces a unit's gradients when its own backward ends, not after ours outside it
    with torch.no_grad():
        return head if torch.allclose(head(hidden_P1D), logits_P1V, rtol=1e-4, atol=1e-5) else None


def _is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _takes_4d_masks(model) -> bool:
    """sdpa and eager attention take the additive 4D masks given (flash-attention kernels do not)."""
    return getattr(getattr(model, "module", model).config, "_attn_implementation", None) in ("sdpa", "eager")

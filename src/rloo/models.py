"""Policy / reference loading and per-token log-probs of completions given their prompts.

Batches stay grouped: ``prompt_ids_PL`` holds each of the P distinct prompts once and
``completion_ids_BT`` its k completions (B = P * k, rows of one prompt adjacent), so the log-prob pass
runs each prompt once and shares it with its k completions (DESIGN.md §3).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

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

    ``share_prompt`` (DESIGN.md §3): run each prompt once, expand its KV cache to its k completions,
    then run the completions after it. Autograd flows back through the shared prompt states, so
    log-probs and gradients equal those of the repeated computation (``share_prompt=False``: every
    prompt concatenated to each of its completions), which a test checks.
    """
    num_prompts, num_completions = prompt_ids_PL.shape[0], completion_ids_BT.shape[0]
    k = num_completions // num_prompts
    if k * num_prompts != num_completions:
        raise ValueError(f"completion_logprobs: {num_completions} completions is not a multiple of {num_prompts} prompts")
    # transformers turns the KV cache off under gradient checkpointing in training, so share only without it.
    checkpointing = model.training and getattr(getattr(model, "module", model), "is_gradient_checkpointing", False)
    forward = _shared_prompt_logits if share_prompt and k > 1 and not checkpointing else _repeated_prompt_logits
    logits_BTV = forward(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, k)
    logprobs_BT, entropy_BT = selective_logprobs(logits_BTV, completion_ids_BT, temperature, with_entropy)
    return logprobs_BT * completion_mask_BT, entropy_BT * completion_mask_BT if with_entropy else None


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


def _repeated_prompt_logits(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, k):
    """Logits predicting each completion token, from [prompt ; completion] rows (the prompt k times)."""
    input_ids = torch.cat([prompt_ids_PL.repeat_interleave(k, 0), completion_ids_BT], dim=1)
    attention_mask = torch.cat([prompt_mask_PL.repeat_interleave(k, 0), completion_mask_BT], dim=1)
    # Positions count real tokens only, so a left-padded prompt starts at 0 exactly as in generation.
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    num_tokens = completion_ids_BT.shape[1]
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 logits_to_keep=num_tokens + 1, use_cache=False).logits[:, :-1]


@dataclass
class SharedPrefill:
    """P prompts run once, their state repeated for k completions each (B = P * k rows)."""

    cache: Any  # the KV cache, batch repeated k times
    last_logits_BV: torch.Tensor  # logits at each prompt's last token: they predict completion token 0
    attention_mask_BL: torch.Tensor  # the prompt mask, repeated k times
    next_position_B: torch.Tensor  # each prompt's own length: where its completions' positions start


def prefill_shared(model, prompt_ids_PL: torch.Tensor, prompt_mask_PL: torch.Tensor, k: int) -> SharedPrefill:
    """Run each left-padded prompt once and repeat its KV cache k times (DESIGN.md §3); used by the
    log-prob passes (with autograd through the cache) and by generation."""
    out = model(input_ids=prompt_ids_PL, attention_mask=prompt_mask_PL,
                position_ids=(prompt_mask_PL.cumsum(1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
    out.past_key_values.batch_repeat_interleave(k)
    attention_mask_BL = prompt_mask_PL.repeat_interleave(k, 0)
    # Positions continue after each prompt's own length, not the padded width.
    return SharedPrefill(out.past_key_values, out.logits[:, -1].repeat_interleave(k, 0), attention_mask_BL,
                         attention_mask_BL.sum(1))


def _shared_prompt_logits(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, k):
    """The same logits with each prompt run once: its KV cache is repeated k times for the completions."""
    prefill = prefill_shared(model, prompt_ids_PL, prompt_mask_PL, k)
    num_tokens = completion_ids_BT.shape[1]
    position_ids = prefill.next_position_B[:, None] + torch.arange(num_tokens, device=completion_ids_BT.device)[None, :]
    completion_out = model(input_ids=completion_ids_BT,
                           attention_mask=torch.cat([prefill.attention_mask_BL, completion_mask_BT], 1),
                           position_ids=position_ids, past_key_values=prefill.cache, use_cache=True,
                           logits_to_keep=num_tokens)
    # Token 0 is predicted by the prompt's last position; tokens 1..T-1 by completion positions 0..T-2.
    return torch.cat([prefill.last_logits_BV[:, None], completion_out.logits[:, :-1]], dim=1)

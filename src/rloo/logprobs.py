"""Per-token log-probs of completions given their prompts, each prompt computed once for its k completions.

Batches stay grouped: ``prompt_ids_PL`` holds each of the P distinct prompts once and
``completion_ids_BT`` its k completions (B = P * k, rows of one prompt adjacent). Three layouts give
the same log-probs and gradients (DESIGN.md §3; tests check each against the others):

- "slots": the prompt once, then one row per prompt holding its k completions side by side after the
  prompt's KV cache, with a block mask (attention-only models with sdpa / eager attention);
- "rows": the prompt once, its cache (keys and values, sliding windows, recurrent states) repeated for k
  completion rows, with 2D masks that transformers turns into each layer's own mask (sliding windows,
  ALiBi, state-space and hybrid models);
- "repeat": [prompt ; completion] rows, the prompt k times (``share_prompt=False``; any model).

Which one a model takes is decided once by ``choose_prompt_sharing``: the first of slots / rows that its
architecture allows and that reproduces the repeated layout on a probe batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from rloo.architecture import (RouterLogits, architecture, cache_of, differentiable_updates, forward_kwargs,
                               repeat_cache)
from rloo.checkpointing import keeps_cache

logger = logging.getLogger(__name__)

LAYOUTS = ("slots", "rows", "repeat")


def completion_logprobs(
    model,
    prompt_ids_PL: torch.Tensor,
    prompt_mask_PL: torch.Tensor,
    completion_ids_BT: torch.Tensor,
    completion_mask_BT: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    share_prompt: bool = True,
    router: RouterLogits | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log pi(y_t | x, y_<t) of each completion, logits divided by ``temperature`` as in sampling.

    Prompts are left padded (P, L); completions right padded (B, T) with B = P * k, the k rows of a
    prompt adjacent. Returns ``logprobs_BT`` (0 on padding) and, if asked, ``entropy_BT`` (detached).
    ``share_prompt`` runs each prompt once (the model's layout, ``prompt_sharing``); autograd flows back
    through the shared prompt states, so log-probs and gradients equal the repeated computation's.
    ``router``: collects a mixture-of-experts model's router logits of the real tokens (each once).
    """
    num_prompts, num_completions = prompt_ids_PL.shape[0], completion_ids_BT.shape[0]
    k = num_completions // num_prompts
    if k * num_prompts != num_completions:
        raise ValueError(f"completion_logprobs: {num_completions} completions is not a multiple of {num_prompts} prompts")
    layout = pass_layout(model, share_prompt, k, prompt_ids_PL.shape[1] + completion_ids_BT.shape[1])
    forward = {"slots": _slots_logits, "rows": _rows_logits, "repeat": _repeated_logits}[layout]
    parts = [(selective_logprobs_from_hidden if isinstance(inputs, HiddenStates) else selective_logprobs)(
                 inputs, ids, temperature, with_entropy)
             for inputs, ids in forward(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, k,
                                        router)]
    logprobs_BT = torch.cat([logprobs for logprobs, _ in parts], dim=1) * completion_mask_BT
    entropy_BT = torch.cat([entropy for _, entropy in parts], dim=1) * completion_mask_BT if with_entropy else None
    return logprobs_BT, entropy_BT


def prompt_sharing(model) -> str:
    """The model's layout, settled by ``choose_prompt_sharing`` on first use."""
    root = getattr(model, "module", model)
    chosen = root.__dict__.get("_rloo_prompt_sharing")
    return chosen if chosen is not None else choose_prompt_sharing(model)


def pass_layout(model, share_prompt: bool, k: int, num_columns: int) -> str:
    """The layout of one pass: the model's, unless the prompt cannot be shared here (one completion per
    prompt, prompt sharing off, gradient checkpointing other than rloo's, which keeps the cache in training:
    ``checkpointing.enable_gradient_checkpointing``) or a sliding window cuts into this batch's
    ``num_columns`` (then rows, which transformers masks)."""
    root = getattr(model, "module", model)
    checkpointing = model.training and getattr(root, "is_gradient_checkpointing", False)
    if checkpointing and not (keeps_cache(root) and root.__dict__.get("_rloo_checkpointed_sharing", True)):
        return "repeat"
    if not share_prompt or k == 1:
        return "repeat"
    layout = prompt_sharing(model)
    if layout == "slots" and not architecture(root).slots_fit(num_columns):
        return "rows"
    return layout


@torch.no_grad()
def choose_prompt_sharing(model, *others) -> str:
    """Settle how ``model`` (and ``others`` of its architecture: the reference) shares prompts: the first
    layout its architecture allows whose log-probs on a probe batch equal the repeated layout's (1e-5,
    or 3e-2 for bf16 / fp16 weights). One info line when the k completions cannot sit side by side."""
    root = getattr(model, "module", model)
    arch = architecture(root)
    candidates = (["slots"] if arch.takes_4d_masks else []) + ["rows"]
    probe = _probe_batch(root)
    was_training = model.training
    model.eval()
    tolerance = 1e-5 if next(root.parameters()).dtype == torch.float32 else 3e-2
    chosen = "repeat"
    # Without autocast: bf16 compute differs between layouts by its own rounding (1e-2), not by a wrong mask.
    try:
        with torch.autocast(probe[0].device.type, enabled=False):
            reference, _ = _with_layout(model, "repeat", probe)
            for layout in candidates:
                try:
                    got, _ = _with_layout(model, layout, probe)
                except Exception as err:  # noqa: BLE001 - a layout this model cannot take is not used
                    logger.debug("prompt sharing '%s' failed on %s: %s", layout, arch.name, err)
                    continue
                if (got - reference).abs().max().item() <= tolerance:
                    chosen = layout
                    break
        if chosen != "repeat" and keeps_cache(root):  # training mode: each checkpointed layer still writes its cache
            with torch.autocast(probe[0].device.type, enabled=False):
                root.train()
                for module in root.modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.eval()
                got, _ = _with_layout(root, chosen, probe)
                if (got - _with_layout(root, "repeat", probe)[0]).abs().max().item() > tolerance:
                    root.__dict__["_rloo_checkpointed_sharing"] = False
                    logger.info("%s: under gradient checkpointing, the training pass repeats each prompt for its k "
                                "completions (its checkpointed layers do not continue from a cache)", arch.name)
    finally:
        model.train(was_training)
    for target in (model, *others):
        if target is not None:
            getattr(target, "module", target).__dict__["_rloo_prompt_sharing"] = chosen
    if chosen == "rows":
        logger.info("%s: each prompt runs once and its cache is repeated for the k completions (its %s layers cannot "
                    "take them side by side in one row)", arch.name, _why_not_slots(arch))
    elif chosen == "repeat":
        logger.info("%s: each prompt is repeated for its k completions (a cached continuation does not reproduce "
                    "its full forward, so the prompt cannot be shared)", arch.name)
    return chosen


def _why_not_slots(arch) -> str:
    if arch.alibi:
        return "ALiBi"
    if not arch.attention_only:
        return "recurrent (state-space / linear attention)"
    if arch.attention not in ("sdpa", "eager"):
        return f"{arch.attention}"
    return "sliding-window"


def _probe_batch(model) -> tuple[torch.Tensor, ...]:
    """Two left-padded prompts (6 and 4 tokens) with two completions each (6 and 4 tokens), random ids: long
    enough for a recurrent state that a cached continuation drops to show."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 6), generator=generator)
    prompt_mask_PL = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    completion_ids_BT = torch.randint(0, vocab, (4, 6), generator=generator)
    completion_mask_BT = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1] * 6, [1] * 6])
    return tuple(t.to(device) for t in (ids, prompt_mask_PL, completion_ids_BT, completion_mask_BT))


def _with_layout(model, layout: str, batch) -> tuple[torch.Tensor, None]:
    root = getattr(model, "module", model)
    saved = root.__dict__.get("_rloo_prompt_sharing")
    root.__dict__["_rloo_prompt_sharing"] = layout if layout != "repeat" else "slots"
    try:
        return completion_logprobs(model, *batch, share_prompt=layout != "repeat")
    finally:
        if saved is None:
            root.__dict__.pop("_rloo_prompt_sharing", None)
        else:
            root.__dict__["_rloo_prompt_sharing"] = saved


# ------------------------------------------------------------------------------------------- layouts
def _positions(mask_PL: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so a left-padded prompt starts at 0 exactly as alone (clamped:
    GPT-2's and GPT-J's position tables cannot take -1 on padding)."""
    return (mask_PL.cumsum(1) - 1).clamp(min=0)


def _repeated_logits(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, k, router):
    """[(logits, ids)] predicting each completion token, from [prompt ; completion] rows (the prompt k times)."""
    arch = architecture(getattr(model, "module", model))
    input_ids = torch.cat([prompt_ids_PL.repeat_interleave(k, 0), completion_ids_BT], dim=1)
    attention_mask = torch.cat([prompt_mask_PL.repeat_interleave(k, 0), completion_mask_BT], dim=1)
    if router is not None:  # each prompt's tokens counted once: in the first of its k rows
        first_B = (torch.arange(input_ids.shape[0], device=input_ids.device) % k == 0)[:, None]
        router.next_forward(torch.cat([prompt_mask_PL.repeat_interleave(k, 0) * first_B, completion_mask_BT], dim=1))
    num_tokens = completion_ids_BT.shape[1]
    logits_BTV = model(input_ids=input_ids, **forward_kwargs(arch, attention_mask, _positions(attention_mask)),
                       logits_to_keep=num_tokens + 1, use_cache=False).logits[:, :-1]
    return [(logits_BTV, completion_ids_BT)]


def _prompt_forward(model, prompt_ids_PL, prompt_mask_PL, router, four_d: bool, **kwargs):
    """Each left-padded prompt once, its cache and the logits at its last token (they predict completion
    token 0). ``four_d``: one additive 4D causal mask (the slots layout), else the 2D mask."""
    arch = architecture(getattr(model, "module", model))
    mask = prompt_mask_PL
    if four_d:
        length = prompt_ids_PL.shape[1]
        causal_LL = torch.ones(length, length, dtype=torch.bool, device=prompt_ids_PL.device).tril()
        mask = attention_bias(model, causal_LL[None] & prompt_mask_PL.bool()[:, None, :])
    if router is not None:
        router.next_forward(prompt_mask_PL)
    return model(input_ids=prompt_ids_PL, **forward_kwargs(arch, mask, _positions(prompt_mask_PL)), use_cache=True,
                 logits_to_keep=1, **kwargs)


def _rows_logits(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, k, router):
    """The prompt once; its cache repeated k times (every kind of layer state); the completions as rows."""
    arch = architecture(getattr(model, "module", model))
    num_prompts, num_tokens = prompt_ids_PL.shape[0], completion_ids_BT.shape[1]
    out = _prompt_forward(model, prompt_ids_PL, prompt_mask_PL, router, four_d=False, output_hidden_states=True)
    first = (out.logits[:, -1].repeat_interleave(k, 0)[:, None], completion_ids_BT[:, :1])
    if num_tokens == 1:
        return [first]
    head = _plain_output_head(model, out.hidden_states[-1][:, -1:], out.logits[:, -1:])
    cache = cache_of(out)
    repeat_cache(cache, torch.arange(num_prompts, device=prompt_ids_PL.device).repeat_interleave(k))
    if torch.is_grad_enabled():
        differentiable_updates(cache)
    mask_BL = torch.cat([prompt_mask_PL.repeat_interleave(k, 0), completion_mask_BT], dim=1)
    positions_BT = prompt_mask_PL.sum(1).repeat_interleave(k)[:, None] + torch.arange(num_tokens, device=mask_BL.device)
    if router is not None:
        router.next_forward(completion_mask_BT)
    rows_out = model(input_ids=completion_ids_BT, **forward_kwargs(arch, mask_BL, positions_BT, cache), use_cache=True,
                     output_hidden_states=head is not None, logits_to_keep=1 if head is not None else num_tokens)
    if head is None:
        return [first, (rows_out.logits[:, :-1], completion_ids_BT[:, 1:])]
    return [first, (HiddenStates(rows_out.hidden_states[-1][:, :-1], head), completion_ids_BT[:, 1:])]


def _slots_logits(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, k, router):
    """The prompt once, then its k completions side by side in one row after its (unrepeated) KV cache.

    Row p of the second forward holds slots [c_1 | ... | c_k] of T tokens each after prompt p's KV
    cache; a block mask lets slot s see the prompt's real tokens and its own earlier tokens only, and
    positions restart at the prompt's length in every slot. So every completion token sees exactly what
    it sees in [prompt ; completion] rows. Token 0 is predicted by the prompt's last position, tokens
    1..T-1 by slot positions 0..T-2. Those take the final hidden states to
    ``selective_logprobs_from_hidden`` (no (B, T, V) logits), when the model's logits are its output
    embedding applied to them (checked on the prompt's last position; else logits).
    """
    arch = architecture(getattr(model, "module", model))
    num_prompts, num_tokens = prompt_ids_PL.shape[0], completion_ids_BT.shape[1]
    device = completion_ids_BT.device
    out = _prompt_forward(model, prompt_ids_PL, prompt_mask_PL, router, four_d=True, output_hidden_states=True)
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
    if router is not None:
        router.next_forward(completion_mask_BT)  # (P * k, T) flattened is the slot order of (P, k * T)
    slots_out = model(input_ids=completion_ids_BT.reshape(num_prompts, k * num_tokens),
                      **forward_kwargs(arch, attention_bias(model, allowed_PSK),
                                       prompt_mask_PL.sum(1, keepdim=True) + slot_token_S[None], cache_of(out)),
                      use_cache=True, output_hidden_states=head is not None,
                      logits_to_keep=1 if head is not None else keep_S)
    if head is None:
        return [first, (slots_out.logits.reshape(num_prompts * k, num_tokens - 1, -1), completion_ids_BT[:, 1:])]
    hidden_BTD = slots_out.hidden_states[-1][:, keep_S].reshape(num_prompts * k, num_tokens - 1, -1)
    return [first, (HiddenStates(hidden_BTD, head), completion_ids_BT[:, 1:])]


def attention_bias(model, allowed_BQK: torch.Tensor) -> torch.Tensor:
    """An additive (B, 1, Q, K) mask in the compute dtype (autocast's, else the weights'), which sdpa and
    eager attention use as given, so every layer shares one tensor (from a 2D mask, each layer's sdpa call
    converts a boolean mask to a new float one and keeps it for backward: 6 x 8 MB for 8 prompts of 512
    tokens). In the compute dtype because a float32 minimum turns into -inf in bf16, and a fully masked
    padding row would then give NaN."""
    device = allowed_BQK.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = next(getattr(model, "module", model).parameters()).dtype
    bias = torch.zeros(allowed_BQK.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed_BQK, torch.finfo(dtype).min)[:, None]


# ------------------------------------------------------------------------------------- log-softmax
def selective_logprobs(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, temperature: float = 1.0,
                       with_entropy: bool = False, rows_per_chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[id] as logit[id] - logsumexp(logits), a few rows at a time, in float32.

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


@dataclass
class HiddenStates:
    """Final hidden states and the output layer that turns them into logits (applied chunk by chunk)."""

    hidden_BTD: torch.Tensor
    head: torch.nn.Linear


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


def _plain_output_head(model, hidden_P1D: torch.Tensor, logits_P1V: torch.Tensor) -> torch.nn.Linear | None:
    """The output embedding, if the model's logits are exactly that layer applied to its final hidden
    states (not so with logit soft-capping or scaling, as Gemma 2, Granite or Cohere do); else None."""
    root = getattr(model, "module", model)
    head = root.get_output_embeddings()
    config = root.config.get_text_config() if hasattr(root.config, "get_text_config") else root.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None  # soft-capping or scaling of the logits (a tiny random model's may hide within tolerance)
    if not isinstance(head, torch.nn.Linear) or head.weight.numel() != head.in_features * head.out_features:
        return None  # not a plain layer, or its weight is partitioned (ZeRO-3) outside the model's forward
    if _is_fsdp(root) or _is_fsdp(head):
        return None  # FSDP reduces a unit's gradients when its own backward ends, not after ours outside it
    with torch.no_grad():
        return head if torch.allclose(head(hidden_P1D).float(), logits_P1V.float(), rtol=1e-4, atol=1e-5) else None


# Config fields by which transformers models change the logits after the output layer.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier_scale")


def _is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)

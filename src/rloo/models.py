"""Loading the policy and its tokenizer, the reference copy, dropout off, and the facts of a policy the
trainer needs (EOS ids, the context's prompt limit, the MoE router loss weight). The log-prob passes
are logprobs.py's; what each architecture's forward takes is architecture.py's."""

from __future__ import annotations

import copy
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from rloo.hub import from_pretrained
from rloo.output_dir import recover_if_free
from rloo.tiny import ensure_tldr_tiny_base, ensure_tldr_tiny_policy

logger = logging.getLogger(__name__)

BUILT_IN = {"rloo:tldr-tiny-sft": ensure_tldr_tiny_policy, "rloo:tldr-tiny-base": ensure_tldr_tiny_base}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """'rloo:tldr-tiny-sft' (or its random-init base, 'rloo:tldr-tiny-base') -> the cached folder (built on first
    use); anything else unchanged."""
    if name_or_path in BUILT_IN:
        return str(BUILT_IN[name_or_path]())
    if name_or_path.startswith("rloo:"):
        raise ValueError(f"model_name_or_path: unknown built-in model '{name_or_path}' (known: {', '.join(BUILT_IN)})")
    if Path(name_or_path).is_dir():
        recover_if_free(Path(name_or_path))  # a run folder whose final model a killed run left half installed
    return name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The policy tokenizer, with a pad token (EOS when the model has none, as TRL does)."""
    kwargs = {"revision": revision} if revision not in (None, "main") else {}
    tokenizer = from_pretrained(AutoTokenizer, name_or_path, "tokenizer", trust_remote_code=trust_remote_code, **kwargs)
    if len(tokenizer.get_vocab()) <= len(tokenizer.get_added_vocab()):  # no files: only special tokens, no error
        raise ValueError(f"tokenizer: '{name_or_path}' holds no tokenizer (tokenizer.json / tokenizer_config.json "
                         "with a vocabulary); save the policy's with tokenizer.save_pretrained(folder)")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of '{name_or_path}' has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(name_or_path: str, torch_dtype: str = "auto", trust_remote_code: bool = False,
                revision: str | None = None, attn_implementation: str | None = None, **kwargs: Any) -> PreTrainedModel:
    """A causal LM from safetensors only (no pickle), with remote code off unless asked for; ``kwargs``
    (TRL's model_init_kwargs) go to from_pretrained as they are."""
    if revision not in (None, "main"):
        kwargs["revision"] = revision
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return from_pretrained(AutoModelForCausalLM, name_or_path, "policy model", dtype=DTYPES.get(torch_dtype, "auto"),
                               trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs)
    except TypeError as err:  # a model_init_kwargs key from_pretrained does not take
        raise ValueError(f"model_init_kwargs {sorted(kwargs)}: from_pretrained of '{name_or_path}' refused them "
                         f"({' '.join(str(err).split())})") from None


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The reference policy: a copy of ``model`` as it is in memory now (not reloaded from disk)."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


# Training-only randomness besides nn.Dropout modules, by attribute name: functional dropout rates that
# models copy from their config (OPT's ``dropout``, Llama's ``attention_dropout``, GPT-2's ``attn_pdrop``),
# layer drop (OPT, Whisper) and MoE router jitter (Mixtral's ``jitter_noise``).
_RANDOM_IN_TRAINING = re.compile(r"(dropout|pdrop|layerdrop|jitter)", re.IGNORECASE)


def disable_dropout(model: torch.nn.Module) -> dict[tuple[int, str], tuple[Any, float]]:
    """Every dropout off (TRL's ``disable_dropout`` sets nn.Dropout modules to p = 0; many models also apply
    dropout functionally with a rate copied from their config, or drop layers): with any of it, the training
    pass would not reproduce the sampling policy's log-probs (ratio != 1 on-policy) and the KL to an
    identical reference would not be 0. Sets nn.Dropout p, and float attributes of modules and configs whose
    name says dropout, pdrop, layerdrop or jitter, to 0. Returns the configs' original values, which the
    saved model folder keeps (``restored_config``): the model a user takes away has its own dropout."""
    configs = [getattr(model, "config", None)]
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if isinstance(value, float) and _RANDOM_IN_TRAINING.search(name):
                setattr(module, name, 0.0)
        configs.append(getattr(module, "config", None))
    originals: dict[tuple[int, str], tuple[Any, float]] = {}
    for config in configs:
        for sub in (config, *(getattr(config, key, None) for key in ("text_config", "decoder"))):
            if sub is None or not hasattr(sub, "to_dict"):
                continue
            for name, value in list(vars(sub).items()):
                if isinstance(value, float) and value and _RANDOM_IN_TRAINING.search(name):
                    originals[(id(sub), name)] = (sub, value)
                    setattr(sub, name, 0.0)
    return originals


@contextmanager
def restored_config(originals: dict[tuple[int, str], tuple[Any, float]]):
    """The configs' dropout rates as they were before ``disable_dropout``, for the ``with`` block (saving)."""
    for (_, name), (config, value) in originals.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for (_, name), (config, _) in originals.items():
            setattr(config, name, 0.0)


def router_aux_loss_coef(model: torch.nn.Module, coef: float | None) -> float:
    """The weight of a mixture-of-experts policy's router load-balancing loss, as TRL decides it: ``coef``, else
    the model config's ``router_aux_loss_coef``; 0 for models without router logits (``output_router_logits``)."""
    config = getattr(model, "module", model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    is_moe = hasattr(config, "output_router_logits")
    if coef and not is_moe:
        raise ValueError(f"router_aux_loss_coef={coef}: {type(model).__name__} is not a mixture-of-experts model with "
                         "router logits, so there is no load-balancing loss to weight")
    if not is_moe:
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else float(coef)


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

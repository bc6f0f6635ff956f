"""Gradient checkpointing that keeps the shared prompt (``gradient_checkpointing``, ``gradient_checkpointing_kwargs``).

transformers checkpoints each decoder layer (``GradientCheckpointingLayer``: its activations are dropped after
forward and recomputed in backward) and, in training, takes the cache away from a layer that writes to it,
because backward's replay of the layer would write its keys and values a second time. rloo's passes need the
cache in training: the k completions continue from their prompt's cache, and autograd flows back through it.

So here the cache stays, and each layer's replay runs against the cache as it stood before the layer's first
run; afterwards the cache is put back as it was. The replay reads what the first run read, so backward gets
the same activations (torch's non-reentrant checkpoint checks their shapes, and tests their values: the
log-probs and gradients equal those of the plain pass). What this keeps beyond the checkpointed activations
is each layer's cache before its update: the prompts' keys and values (their recurrent states), a fraction
of one layer's activations.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint

from rloo.sizes import REENTRANT


def enable_gradient_checkpointing(model: torch.nn.Module, checkpoint_kwargs: dict | None = None) -> None:
    """transformers' ``gradient_checkpointing_enable`` with ``checkpoint_kwargs`` (torch's
    ``checkpoint`` arguments, TRL's ``gradient_checkpointing_kwargs``), its layers keeping their cache."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = dict(checkpoint_kwargs or {})
    if kwargs.get("use_reentrant"):
        raise ValueError(REENTRANT)
    kwargs["use_reentrant"] = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if not layers:
        return  # checkpointed some other way: the training pass repeats the prompt (``keeps_cache``)
    for module in layers:
        module._can_checkpoint_with_cache = True  # an instance attribute: transformers' class default stays
        module._gradient_checkpointing_func = functools.partial(checkpoint_layer, **kwargs)
    for module in model.modules():  # the models' own flag only turns their cache off in training
        if hasattr(module, "gradient_checkpointing") and not isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = False
    layer_logger = logging.getLogger("transformers.modeling_layers")
    if _KeptCacheNote not in map(type, layer_logger.filters):
        layer_logger.addFilter(_KeptCacheNote())


class _KeptCacheNote(logging.Filter):
    """Drops transformers' warning that a checkpointed layer's cache is turned off: here the layer keeps it, and
    only its ``use_cache`` flag is set false (that the layers still write the cache then is checked per model by
    ``choose_prompt_sharing``'s probe in training mode)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Caching is incompatible with gradient checkpointing")


def keeps_cache(model: torch.nn.Module) -> bool:
    """Whether every checkpointed layer of ``model`` replays against its cache (``enable_gradient_checkpointing``);
    a module checkpointed some other way cannot continue from a cache in training."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    return bool(checkpointed) and all(isinstance(m, GradientCheckpointingLayer) and getattr(
        m._gradient_checkpointing_func, "func", None) is checkpoint_layer for m in checkpointed)


def checkpoint_layer(function, *args, **checkpoint_kwargs):
    """torch's non-reentrant ``checkpoint(function, *args)``, where a cache among the layer's arguments is, for
    the replay in backward, the cache as the first run found it."""
    from transformers.cache_utils import Cache

    values = (*args, *getattr(function, "keywords", {}).values())
    caches = [value for value in values if isinstance(value, Cache)]
    if not caches:
        return checkpoint(function, *args, **checkpoint_kwargs)
    before = [_state(cache) for cache in caches]
    runs = []

    def run(*inputs):
        if not runs:
            runs.append(1)
            return function(*inputs)
        after = [_state(cache) for cache in caches]
        for cache, state in zip(caches, before):
            _restore(cache, state)
        try:
            return function(*inputs)
        finally:
            for cache, state in zip(caches, after):
                _restore(cache, state)

    return checkpoint(run, *args, **checkpoint_kwargs)


def _state(cache) -> list[tuple[object, dict]]:
    """The attributes of ``cache`` and of each of its layers (tensors by reference: updates assign new ones;
    lists and dicts one level deep, as recurrent states are kept in lists)."""
    objects = [cache, *getattr(cache, "layers", [])]
    return [(obj, {key: list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
                   for key, value in vars(obj).items()}) for obj in objects]


def _restore(cache, state: list[tuple[object, dict]]) -> None:
    for obj, attributes in state:
        vars(obj).clear()
        vars(obj).update(attributes)

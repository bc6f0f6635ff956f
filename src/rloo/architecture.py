"""What a causal LM's forward needs, read from transformers' own declarations, so that generation and the
log-prob passes feed every architecture what it expects.

- ``architecture(model)``: the layer kinds (from the cache transformers builds for the config: full,
  sliding-window or recurrent layers), ALiBi, the attention kernel, the cache keyword (``cache_params``
  for Mamba), which forward arguments exist, and the router of a mixture-of-experts model.
- ``forward_kwargs(...)``: the mask, positions and cache arguments of one call, as the model takes them.
- ``repeat_cache(cache, index)``: rows of any transformers cache (attention, sliding, recurrent states)
  selected or repeated, with transformers' own ``reorder_cache``.
- ``RouterLogits``: a MoE policy's router logits during a pass (forward hooks on the router modules
  transformers declares in ``_can_record_outputs``), and their load-balancing loss over real tokens.

How prompts are shared per architecture (``prompt_sharing``, chosen and checked in ``logprobs.py``):
"slots" (the k completions side by side after one prompt cache, block masks: attention-only models);
"rows" (one prompt cache repeated for k completion rows: sliding windows, ALiBi, recurrent layers);
"repeat" (each prompt k times).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


@dataclass(frozen=True)
class Architecture:
    name: str  # the model class
    layer_kinds: tuple[str, ...]  # per cache layer: "full", "sliding" or "recurrent" (state-space, conv, linear)
    sliding_window: int | None  # of the sliding layers
    alibi: bool  # positions as an attention bias built from the 2D mask (Bloom, Falcon with alibi)
    attention: str | None  # config._attn_implementation: sdpa, eager, flash_attention_2...
    cache_keyword: str  # "past_key_values", or "cache_params" (Mamba, Mamba2)
    arguments: frozenset[str]  # forward's named parameters
    router: object | None  # transformers' OutputRecorder of the MoE router logits; None: not MoE

    @property
    def attention_only(self) -> bool:
        return all(kind in ("full", "sliding") for kind in self.layer_kinds)

    @property
    def takes_4d_masks(self) -> bool:
        """sdpa and eager attention take additive 4D masks as given (flash kernels and ALiBi do not)."""
        return self.attention in ("sdpa", "eager") and not self.alibi and self.attention_only

    def slots_fit(self, num_columns: int) -> bool:
        """Side-by-side slots after a full prompt cache are exact when no sliding window cuts into
        ``num_columns`` (padded prompt + one completion): then every layer sees what a full one sees."""
        return self.sliding_window is None or "sliding" not in self.layer_kinds or num_columns <= self.sliding_window


def architecture(model: torch.nn.Module) -> Architecture:
    """The facts of ``model`` (computed once, kept on the model; DDP wrappers are looked through)."""
    root = getattr(model, "module", model)
    found = root.__dict__.get("_rloo_architecture")
    if found is None:
        found = _read_architecture(root)
        root.__dict__["_rloo_architecture"] = found
    return found


def _read_architecture(model: torch.nn.Module) -> Architecture:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds, window = [], None
    try:
        layers = DynamicCache(config=text).layers  # the cache transformers builds for this config, lazily
    except Exception:  # a config the cache does not know: treat every layer as full attention
        layers = [DynamicLayer()]
    for layer in layers:
        if hasattr(layer, "conv_states") or hasattr(layer, "recurrent_states"):
            kinds.append("recurrent")
        elif isinstance(layer, DynamicSlidingWindowLayer):
            kinds.append("sliding")
            window = getattr(layer, "sliding_window", None) or getattr(text, "sliding_window", None)
        else:
            kinds.append("full")
    arguments = _forward_arguments(type(model))
    router = None
    for cls in type(model).__mro__:
        router = (getattr(cls, "_can_record_outputs", None) or {}).get("router_logits")
        if router is not None:
            break
    alibi = bool(getattr(text, "alibi", False)) or text.model_type in ("bloom", "mpt")
    return Architecture(type(model).__name__, tuple(kinds), window, alibi, getattr(text, "_attn_implementation", None),
                        "cache_params" if "cache_params" in arguments and "past_key_values" not in arguments
                        else "past_key_values", arguments, router if "output_router_logits" in arguments else None)


def _forward_arguments(cls: type) -> frozenset[str]:
    """The named parameters of the model class's forward, through subclasses that wrap it as
    ``forward(*args, **kwargs)``: the union over the classes that define one."""
    names: set[str] = set()
    for klass in cls.__mro__:
        forward = klass.__dict__.get("forward")
        if forward is None or klass is torch.nn.Module:
            continue
        parameters = inspect.signature(inspect.unwrap(forward)).parameters.values()
        names.update(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return frozenset(names - {"self"})


def forward_kwargs(arch: Architecture, attention_mask, position_ids, cache=None, decoding: bool = False) -> dict:
    """The mask / position / cache arguments of one forward, as ``arch`` takes them: positions only where
    the forward has them (Bloom's ALiBi reads the 2D mask), Mamba's ``cache_params`` with no mask while
    decoding (Mamba-1 broadcasts a decode-time mask wrongly), router logits off (rloo's own hooks collect
    them: transformers' aux loss needs the 2D mask of the whole input, which a cached pass does not have)."""
    kwargs = {"attention_mask": attention_mask}
    if "position_ids" in arch.arguments:
        kwargs["position_ids"] = position_ids
    if cache is not None:
        kwargs[arch.cache_keyword] = cache
        if arch.cache_keyword == "cache_params" and decoding:
            kwargs["attention_mask"] = None
    if arch.router is not None:
        kwargs["output_router_logits"] = False
    return kwargs


def cache_of(output) -> object:
    """The cache a forward returned (``past_key_values``, or Mamba's ``cache_params``)."""
    cache = getattr(output, "past_key_values", None)
    return cache if cache is not None else getattr(output, "cache_params", None)


def repeat_cache(cache, index_B: torch.Tensor) -> None:
    """Keep rows ``index_B`` of every layer of a transformers cache, in place (``arange(P).repeat_interleave(k)``
    repeats each prompt's state k times): keys and values, sliding windows, conv and recurrent states alike
    (transformers' beam-search ``reorder_cache``, differentiable: index_select)."""
    for layer in cache.layers:
        layer.reorder_cache(index_B)


def _is_recorded(recorder, name: str, module: torch.nn.Module) -> bool:
    """Whether transformers' ``OutputRecorder`` would capture this module's output (its own matching rules:
    the class, or the end of the module's name; then, if given, the layer name between dots)."""
    if isinstance(recorder, type):  # a bare class in _can_record_outputs
        return isinstance(module, recorder)
    target, class_name = getattr(recorder, "target_class", None), getattr(recorder, "class_name", None)
    if not ((target is not None and isinstance(module, target)) or (class_name is not None and name.endswith(class_name))):
        return False
    layer_name = getattr(recorder, "layer_name", None)
    return layer_name is None or f".{layer_name.strip('.')}." in f".{name}."


def differentiable_updates(cache) -> None:
    """Make the recurrent layers of ``cache`` store their next states by assignment instead of transformers'
    in-place copies (kept for CUDA graphs), so a pass with gradients can continue from the cache: a copy
    into the state it has just read would break that read's backward."""
    for layer in cache.layers:
        if not hasattr(layer, "recurrent_states"):
            continue
        layer.record_past = True  # conv states: assigned (kept whole), not copied into the old buffer

        def update_recurrent_state(recurrent_states, state_idx=0, _layer=layer, **kwargs):
            if not _layer.is_recurrent_states_initialized[state_idx]:
                _layer.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
            _layer.recurrent_states[state_idx] = recurrent_states
            return recurrent_states

        layer.update_recurrent_state = update_recurrent_state


class RouterLogits:
    """Router logits of a mixture-of-experts model over the real tokens of a pass, and their load-balancing
    loss (Switch Transformer's, transformers' ``load_balancing_loss_func`` of the model's own module).

    Forward hooks on the router modules record each router call; before each forward, ``next_forward``
    gives the flat mask of that forward's real tokens (each prompt once, each completion token once), so
    a shared-prompt pass and a repeated one count the same tokens and give the same loss."""

    def __init__(self, model: torch.nn.Module):
        root = getattr(model, "module", model)
        arch = architecture(root)
        if arch.router is None:
            raise ValueError(f"RouterLogits: {arch.name} declares no router logits")
        self.loss_fn = getattr(sys.modules[type(root).__module__], "load_balancing_loss_func", None)
        if self.loss_fn is None:
            raise ValueError(f"router_aux_loss_coef: {arch.name}'s module has no load_balancing_loss_func; set "
                             "router_aux_loss_coef 0")
        self.num_experts = getattr(root, "num_experts", None) or getattr(root.config, "num_local_experts", None)
        self.top_k = getattr(root, "num_experts_per_tok", None) or getattr(root.config, "num_experts_per_tok", 2)
        self.index = getattr(arch.router, "index", 0)
        self.forwards: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self.handles = [module.register_forward_hook(self._record) for name, module in root.named_modules()
                        if _is_recorded(arch.router, name, module)]

    def next_forward(self, token_mask_N: torch.Tensor) -> None:
        self.forwards.append((token_mask_N.reshape(-1).bool(), []))

    def _record(self, module, inputs, output) -> None:
        if self.forwards:
            logits = output[self.index] if isinstance(output, (tuple, list)) else output
            self.forwards[-1][1].append(logits.reshape(-1, logits.shape[-1]))

    def loss(self) -> torch.Tensor:
        """The load-balancing loss of every real token of the pass, each router layer weighted equally."""
        num_layers = len(self.forwards[0][1])
        per_layer = tuple(torch.cat([calls[layer][mask] for mask, calls in self.forwards]) for layer in range(num_layers))
        return self.loss_fn(per_layer, self.num_experts, self.top_k, None)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

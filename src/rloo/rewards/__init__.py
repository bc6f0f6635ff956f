"""Reward sources: the RewardFn contract, building a run's sources, scoring a batch.

A reward function is a plain callable with TRL's contract (DESIGN.md §5), so TRL users' functions run
unchanged::

    fn(*, prompts, completions, completion_ids, trainer_state, **kwargs) -> list[float | None]

called with keywords only (take what you need, ignore the rest through ``**kwargs``): ``prompts`` and
``completions`` (text; for conversational datasets message lists, a completion being
``[{"role": "assistant", "content": ...}]``), every dataset column other than ``prompt`` (e.g.
``completion`` = reference summaries), ``prompt_ids`` (the policy's prompt tokens, after truncation),
``completion_ids`` (tokens up to and including the first EOS), ``truncated`` (no EOS within the token
limit), ``trainer_state`` (transformers' TrainerState) and TRL's ``log_metric(name, value)`` /
``log_extra(column, values)``. It returns one value per completion (None: not applicable to that
sample); ``async def`` functions run concurrently. A reward model is one more such callable
(``RewardModel``), so the trainer never branches on the kind.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from rloo.errors import RewardFunctionError
from rloo.rewards.loading import BUILTIN_REWARDS, is_reward_model_spec, load_reward_fn
from rloo.rewards.model import RewardModel
from rloo.rewards.scoring import is_async, score_completions

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "RewardFunctionError",
    "RewardModel",
    "RewardSources",
    "build_rewards",
    "is_async",
    "load_reward_fn",
    "score_completions",
]


class RewardFn(Protocol):
    """``fn(*, prompts, completions, **kwargs) -> list[float | None]``, one value per completion."""

    def __call__(self, *, prompts: list, completions: list, **kwargs: Any) -> list[float | None]: ...


@dataclass
class RewardSources:
    """The reward sources of a run, in order; ``names`` are unique (metric keys, columns of rewards_NF)."""

    names: list[str]
    fns: list[RewardFn]
    weights: list[float]
    timeout: float | None = None  # seconds one call may take (reward_timeout); None: no limit


def build_rewards(
    reward_funcs: Sequence[Any] = (),
    reward_weights: Sequence[float] | None = None,
    reward_model_name_or_path: str | None = None,
    *,
    device: str | torch.device = "cpu",
    reward_model_kwargs: dict[str, Any] | None = None,
    reward_processing_classes: Sequence[Any] | Any = None,
) -> RewardSources:
    """The run's sources in TRL's order: the reward model of ``reward_model_name_or_path`` first (as TRL's
    script puts it), then ``reward_funcs`` in order, each a spec (``loading.py``: a function, or a reward
    model folder / hub id), a callable, a ``RewardModel``, or a transformers sequence classifier, scored
    with its tokenizer from ``reward_processing_classes`` (aligned with ``reward_funcs``, TRL's name) or
    loaded from the model's own folder.

    Weights default to 1.0 each and follow the same order.

    >>> sources = build_rewards(["rouge_l", "grounding"], [2.0, 1.0])
    >>> sources.names, sources.weights
    (['rouge_l', 'grounding'], [2.0, 1.0])
    """
    kwargs = reward_model_kwargs or {}
    processing = _aligned(reward_processing_classes, len(reward_funcs))
    fns: list[RewardFn] = []
    if reward_model_name_or_path is not None:
        fns.append(RewardModel(reward_model_name_or_path, device=device, **kwargs))
    for item, tokenizer in zip(reward_funcs, processing):
        if isinstance(item, str):
            fns.append(RewardModel(item, tokenizer, device=device, **kwargs) if is_reward_model_spec(item)
                       else load_reward_fn(item))
        elif isinstance(item, torch.nn.Module):  # a transformers sequence classifier (TRL: a PreTrainedModel)
            fns.append(RewardModel(item, tokenizer or getattr(item, "name_or_path", None) or None, device=device,
                                   **kwargs))
        elif callable(item):
            fns.append(item)
        else:
            raise TypeError(f"reward_funcs: expected a spec string, a callable or a reward model, got {type(item).__name__}")
    if not fns:
        raise ValueError("no reward source: give reward_funcs and/or reward_model_name_or_path")
    names = _unique_names(fns)
    for name, fn in zip(names, fns):
        _check_accepts_kwargs(name, fn)
    if reward_weights is None:
        weights = [1.0] * len(fns)
    else:
        weights = [float(w) for w in reward_weights]
        if len(weights) != len(fns):
            raise ValueError(
                f"reward_weights has {len(weights)} values but there are {len(fns)} reward sources "
                f"({', '.join(names)})"
            )
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward_weights must be finite numbers, got {weights}")
    return RewardSources(names=names, fns=fns, weights=weights)


def _aligned(processing, count: int) -> list:
    if processing is None:
        return [None] * count
    processing = list(processing) if isinstance(processing, (list, tuple)) else [processing]
    if len(processing) != count:
        raise ValueError(f"reward_processing_classes has {len(processing)} entries for {count} reward_funcs; give one "
                         "per reward function (None for functions)")
    return processing


def _unique_names(fns: Sequence[RewardFn]) -> list[str]:
    names: list[str] = []
    for fn in fns:
        base = getattr(fn, "__name__", None) or type(fn).__name__
        name, suffix = base, 2
        while name in names:
            name, suffix = f"{base}_{suffix}", suffix + 1
        names.append(name)
    return names


def _check_accepts_kwargs(name: str, fn: RewardFn) -> None:
    # Fail at start-up, not at the first step: the trainer passes many keywords (TRL's contract).
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise ValueError(
            f"reward function '{name}' must accept **kwargs: it is called with keywords prompts=, completions=, "
            "completion_ids=, trainer_state=, ... and every dataset column (TRL's contract)"
        )

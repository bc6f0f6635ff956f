"""Reward sources: the RewardFn contract, loading by name or path, and scoring a batch.

A reward function is a plain callable (DESIGN.md §5)::

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

returning one value per completion (None: not applicable to that sample). The trainer passes by
keyword every dataset column other than ``prompt`` (e.g. ``completion`` = reference summaries),
``prompt_ids`` (the policy's prompt tokens, after truncation), ``completion_ids`` (tokens up to and
including the first EOS) and ``truncated`` (no EOS within the
token limit); a function takes what it needs and ignores the rest through ``**kwargs``. A reward
model is one more such callable (``RewardModel``), so the trainer never branches on the kind.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from rloo.errors import RewardFunctionError
from rloo.rewards.builtin import grounding, no_repeated_bigrams, rouge_l, summary_length
from rloo.rewards.model import RewardModel

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "RewardFunctionError",
    "RewardModel",
    "RewardSources",
    "build_rewards",
    "load_reward_fn",
    "score_completions",
]


class RewardFn(Protocol):
    """``fn(prompts, completions, **kwargs) -> list[float | None]``, one value per completion."""

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float | None]: ...


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "rouge_l": rouge_l,
    "grounding": grounding,
    "no_repeated_bigrams": no_repeated_bigrams,
    "summary_length": summary_length,
}

_SPEC_FORMS = "a built-in name ({}), 'package.module:function' or 'path/to/file.py:function'".format(
    ", ".join(BUILTIN_REWARDS)
)


def load_reward_fn(spec: str) -> RewardFn:
    """The reward function named by ``spec``: a built-in name, ``package.module:function`` or
    ``path/to/file.py:function``. Errors are one line naming the spec (ValueError).

    >>> load_reward_fn("grounding").__name__
    'grounding'
    >>> load_reward_fn("rloo.rewards.builtin:summary_length").__name__
    'summary_length'
    """
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    target, _, attr = spec.rpartition(":")  # rpartition: a Windows path "C:\\x.py:fn" keeps its drive
    if not target or not attr:
        raise ValueError(f"reward function '{spec}': expected {_SPEC_FORMS}")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    module = _import_file(spec, target) if is_file else _import_module(spec, target)
    where = "file" if is_file else f"module '{target}'"
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward function '{spec}': {where} has no function '{attr}'")
    if not callable(fn):
        raise ValueError(f"reward function '{spec}': '{attr}' is a {type(fn).__name__}, not a function")
    return fn


def _import_file(spec: str, path: str) -> Any:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ValueError(f"reward function '{spec}': file '{path}' not found")
    # A unique, stable module name; registered in sys.modules so classes and pickling inside it work.
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"rloo_reward_file_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward function '{spec}': cannot load '{path}' as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ValueError(f"reward function '{spec}': running '{path}' failed: {type(err).__name__}: {err}") from err
    return module


def _import_module(spec: str, name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            raise ValueError(f"reward function '{spec}': no module named '{name}'") from None
        raise ValueError(f"reward function '{spec}': importing '{name}' failed: {type(err).__name__}: {err}") from err
    except Exception as err:
        raise ValueError(f"reward function '{spec}': importing '{name}' failed: {type(err).__name__}: {err}") from err


@dataclass
class RewardSources:
    """The reward sources of a run, in order; ``names`` are unique (metric keys, columns of rewards_NF)."""

    names: list[str]
    fns: list[RewardFn]
    weights: list[float]


def build_rewards(
    reward_funcs: Sequence[str | RewardFn] = (),
    reward_weights: Sequence[float] | None = None,
    reward_model_name_or_path: str | None = None,
    *,
    device: str | torch.device = "cpu",
    reward_model_kwargs: dict[str, Any] | None = None,
) -> RewardSources:
    """Load the reward functions (specs or callables) and the reward model, appended last.

    Weights default to 1.0 each and count the reward model when there is one.

    >>> sources = build_rewards(["rouge_l", "grounding"], [2.0, 1.0])
    >>> sources.names, sources.weights
    (['rouge_l', 'grounding'], [2.0, 1.0])
    """
    fns: list[RewardFn] = []
    for item in reward_funcs:
        if isinstance(item, str):
            fns.append(load_reward_fn(item))
        elif callable(item):
            fns.append(item)
        else:
            raise TypeError(f"reward_funcs: expected a spec string or a callable, got {type(item).__name__}")
    if reward_model_name_or_path is not None:
        fns.append(RewardModel(reward_model_name_or_path, device=device, **(reward_model_kwargs or {})))
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
    # Fail at start-up, not at the first step: the trainer always passes prompt_ids, completion_ids, truncated
    # and the dataset columns by keyword.
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise ValueError(
            f"reward function '{name}' must accept **kwargs: it is called as "
            "fn(prompts, completions, prompt_ids=..., completion_ids=..., truncated=..., <dataset columns>=...)"
        )


def score_completions(
    sources: RewardSources,
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list],
    on_error: str = "raise",
    errors: list[str] | None = None,
    **extra: Any,
) -> torch.Tensor:
    """Call every source on the batch: ``rewards_NF`` float32, N completions x F sources.

    ``columns`` (dataset columns other than ``prompt``) and ``extra`` (``prompt_ids``, ``completion_ids``,
    ``truncated``) reach each function by keyword. None and non-finite values become NaN (the
    objective treats a sample with no finite reward as unscorable). Wrong return types or lengths
    raise one line naming the function (TypeError / ValueError).

    A function that raises is called again one sample at a time to find the samples it fails on:
    ``on_error="raise"`` raises ``RewardFunctionError`` naming the function and the first such sample;
    ``"isolate"`` makes those samples NaN for that function and appends one line per failure to ``errors``.

    >>> sources = build_rewards(["no_repeated_bigrams", lambda prompts, completions, **kw: [None, 1]])
    >>> score_completions(sources, ["p", "p"], ["a b a b", "ok"], {})
    tensor([[0.6667,    nan],
            [1.0000, 1.0000]])
    """
    num_completions = len(completions)
    if len(prompts) != num_completions:
        raise ValueError(f"score_completions: {len(prompts)} prompts for {num_completions} completions")
    clash = sorted(set(columns) & set(extra))
    if clash:
        raise ValueError(f"dataset column '{clash[0]}' clashes with a keyword the trainer passes to reward functions")
    for column, values in columns.items():
        if len(values) != num_completions:
            raise ValueError(f"dataset column '{column}' has {len(values)} values for {num_completions} completions")
    kwargs = {**columns, **extra}
    rewards_NF = torch.full((num_completions, len(sources.fns)), math.nan, dtype=torch.float32)
    for f, (name, fn) in enumerate(zip(sources.names, sources.fns)):
        try:
            values = _as_floats(name, fn(prompts, completions, **kwargs), num_completions)
        except (TypeError, ValueError) as err:
            if str(err).startswith(f"reward function '{name}'"):  # our own check of what it returned
                raise
            values = _one_by_one(name, fn, prompts, completions, kwargs, on_error, errors)
        except Exception:
            values = _one_by_one(name, fn, prompts, completions, kwargs, on_error, errors)
        rewards_NF[:, f] = torch.tensor(values, dtype=torch.float32)
    return rewards_NF


def _one_by_one(name, fn, prompts, completions, kwargs, on_error, errors) -> list[float]:
    """The function again, one sample at a time: NaN where it raises (isolate) or the first failure (raise)."""
    values = []
    for i in range(len(completions)):
        one = {key: [value[i]] for key, value in kwargs.items()}
        try:
            values += _as_floats(name, fn([prompts[i]], [completions[i]], **one), 1)
        except Exception as err:
            what = " ".join(str(err).split())  # one line, whatever the function's message
            line = (f"reward function '{name}' raised {type(err).__name__}: {what} on sample {i} of the batch "
                    f"(completion {completions[i][:60]!r})")
            if on_error == "raise":
                raise RewardFunctionError(line) from err
            if errors is not None:
                errors.append(line)
            values.append(math.nan)
    if on_error == "raise":  # each sample alone passed: the batch call itself fails
        raise RewardFunctionError(f"reward function '{name}' raised on the batch of {len(completions)} samples but on "
                                  "none of them alone")
    return values


def _as_floats(name: str, values: Any, num_completions: int) -> list[float]:
    """Validate one function's return value; None and non-finite values -> NaN."""
    if isinstance(values, torch.Tensor) or type(values).__module__ == "numpy":
        if getattr(values, "ndim", None) != 1:
            raise TypeError(
                f"reward function '{name}' returned a {type(values).__name__} of shape "
                f"{tuple(getattr(values, 'shape', ()))}; expected one value per completion (1-D)"
            )
        values = values.tolist()
    elif not isinstance(values, (list, tuple)):
        raise TypeError(
            f"reward function '{name}' returned {type(values).__name__}; "
            "expected a list of floats or None, one per completion"
        )
    if len(values) != num_completions:
        raise ValueError(f"reward function '{name}' returned {len(values)} values for {num_completions} completions")
    floats = []
    for i, value in enumerate(values):
        if value is None:
            floats.append(math.nan)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
            floats.append(number if math.isfinite(number) else math.nan)
        else:
            raise TypeError(
                f"reward function '{name}' returned {type(value).__name__} at index {i}; "
                "expected a real number or None"
            )
    return floats

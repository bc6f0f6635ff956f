"""Calling reward sources on a batch, as TRL's RLOOTrainer does: every argument by keyword, plain
functions first, ``async def`` functions then, concurrently; values checked, None and non-finite
values as NaN; a function that raises is found out sample by sample.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
import threading
from typing import Any

import torch

from rloo.errors import RewardFunctionError


def is_async(fn: Any) -> bool:
    """``async def`` functions and objects whose ``__call__`` is one (TRL's test, partials unwrapped)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """One event loop in a daemon thread for async reward functions (as TRL), so that scoring works
    the same inside a running loop (a notebook) as outside one."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="rloo-async-rewards", daemon=True).start()
        return _loop


def _await_all(calls: list) -> list:
    """Run coroutine functions concurrently: their results, or the exception each raised."""
    async def gather():
        return await asyncio.gather(*(call() for call in calls), return_exceptions=True)

    return asyncio.run_coroutine_threadsafe(gather(), _event_loop()).result()


def score_completions(
    sources,
    prompts: list,
    completions: list,
    columns: dict[str, list],
    on_error: str = "raise",
    errors: list[str] | None = None,
    shared: dict[str, Any] | None = None,
    **per_sample: list,
) -> torch.Tensor:
    """Call every source on the batch: ``rewards_NF`` float32, N completions x F sources.

    Each source is called with keywords only: ``prompts=``, ``completions=``, every dataset column
    (``columns``), the per-sample lists ``per_sample`` (``prompt_ids``, ``completion_ids``, ``truncated``)
    and the values in ``shared`` (``trainer_state``, ``log_metric``, ``log_extra``). None and non-finite
    values become NaN (the objective treats a sample with no finite reward as unscorable). Wrong return
    types or lengths raise one line naming the function (TypeError / ValueError).

    A function that raises is called again one sample at a time to find the samples it fails on:
    ``on_error="raise"`` raises ``RewardFunctionError`` naming the function and the first such sample;
    ``"isolate"`` makes those samples NaN for that function and appends one line per failure to ``errors``.

    >>> from rloo.rewards import build_rewards
    >>> sources = build_rewards(["no_repeated_bigrams", lambda completions, **kw: [None, 1]])
    >>> score_completions(sources, ["p", "p"], ["a b a b", "ok"], {})
    tensor([[0.6667,    nan],
            [1.0000, 1.0000]])
    """
    num_completions = len(completions)
    if len(prompts) != num_completions:
        raise ValueError(f"score_completions: {len(prompts)} prompts for {num_completions} completions")
    passed = {"prompts", "completions", *per_sample, *(shared or {})}
    clash = sorted(set(columns) & passed)
    if clash:
        raise ValueError(f"dataset column '{clash[0]}' clashes with a keyword the trainer passes to reward functions")
    for column, values in {**columns, **per_sample}.items():
        if len(values) != num_completions:
            raise ValueError(f"'{column}' has {len(values)} values for {num_completions} completions")
    batch = {"prompts": prompts, "completions": completions, **columns, **per_sample}
    shared = shared or {}
    rewards_NF = torch.full((num_completions, len(sources.fns)), math.nan, dtype=torch.float32)
    synchronous = [f for f, fn in enumerate(sources.fns) if not is_async(fn)]
    asynchronous = [f for f, fn in enumerate(sources.fns) if is_async(fn)]
    results: dict[int, Any] = {}
    for f in synchronous:
        try:
            results[f] = sources.fns[f](**batch, **shared)
        except Exception as err:  # noqa: BLE001 - found out sample by sample below
            results[f] = err
    if asynchronous:
        done = _await_all([functools.partial(sources.fns[f], **batch, **shared) for f in asynchronous])
        results.update(zip(asynchronous, done))
    for f, result in sorted(results.items()):
        name, fn = sources.names[f], sources.fns[f]
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # KeyboardInterrupt, SystemExit: not a reward's failure
        values = None
        if not isinstance(result, Exception):
            values = as_floats(name, result, num_completions)  # our own checks raise: the function's contract
        if values is None:
            values = _one_by_one(name, fn, batch, shared, on_error, errors)
        rewards_NF[:, f] = torch.tensor(values, dtype=torch.float32)
    return rewards_NF


def _call_one(fn, one: dict, shared: dict) -> Any:
    if is_async(fn):
        result = _await_all([functools.partial(fn, **one, **shared)])[0]
        if isinstance(result, BaseException):
            raise result
        return result
    return fn(**one, **shared)


def _one_by_one(name, fn, batch: dict, shared: dict, on_error, errors) -> list[float]:
    """The function again, one sample at a time: NaN where it raises (isolate) or the first failure (raise)."""
    values = []
    completions = batch["completions"]
    for i in range(len(completions)):
        one = {key: [value[i]] for key, value in batch.items()}
        try:
            values += as_floats(name, _call_one(fn, one, shared), 1)
        except Exception as err:
            what = " ".join(str(err).split())  # one line, whatever the function's message
            line = (f"reward function '{name}' raised {type(err).__name__}: {what} on sample {i} of the batch "
                    f"(completion {str(completions[i])[:60]!r})")
            if on_error == "raise":
                raise RewardFunctionError(line) from err
            if errors is not None:
                errors.append(line)
            values.append(math.nan)
    if on_error == "raise":  # each sample alone passed: the batch call itself fails
        raise RewardFunctionError(f"reward function '{name}' raised on the batch of {len(completions)} samples but on "
                                  "none of them alone")
    return values


def as_floats(name: str, values: Any, num_completions: int) -> list[float]:
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

"""Calling reward sources on a batch, as TRL's RLOOTrainer does: every argument by keyword, plain
functions first, ``async def`` functions then, concurrently; values checked, None and non-finite
values as NaN; a function that raises is found out sample by sample.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import math
import numbers
import signal
import threading
from typing import Any

import torch

from rloo.errors import RewardFunctionError, StopNow
from rloo.rewards.deadline import Overran, deadline

logger = logging.getLogger(__name__)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


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


class _Exited:
    """What an ``async def`` function that raised KeyboardInterrupt / SystemExit returned to gather (those
    would otherwise end the event loop's thread and leave the caller waiting)."""

    def __init__(self, error: BaseException):
        self.error = error


class _TimedOut:
    """What an ``async def`` function still running after the timeout returned to gather."""


def _await_all(calls: list, timeout: float | None = None) -> list:
    """Run coroutine functions concurrently: their results, or the exception each raised (``_Exited``,
    ``_TimedOut`` for the ways out that are not a reward's failure)."""
    async def guarded(call):
        async def shielded():  # caught inside the task: asyncio lets these two end the loop's thread
            try:
                return await call()
            except (KeyboardInterrupt, SystemExit) as err:
                return _Exited(err)

        task = asyncio.ensure_future(shielded())
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            return _TimedOut()
        return task.exception() or task.result()

    async def gather():
        return await asyncio.gather(*(guarded(call) for call in calls))

    future = asyncio.run_coroutine_threadsafe(gather(), _event_loop())
    try:  # an async function that blocks the loop itself (time.sleep) is not stopped by asyncio's timeout
        return future.result(timeout=None if timeout is None else timeout + 10)
    except concurrent.futures.TimeoutError:
        future.cancel()
        return [_TimedOut()] * len(calls)


def call_reward(name: str, fn, kwargs: dict, timeout: float | None, num_samples: int):
    """One call of a reward source: its value, or the Exception it raised (found out sample by sample by
    the caller). Overrunning ``timeout`` and leaving by SystemExit / KeyboardInterrupt are not a sample's
    failure: RewardFunctionError at once (``reward_errors isolate`` does not apply)."""
    try:
        if is_async(fn):
            result = _await_all([functools.partial(fn, **kwargs)], timeout)[0]
        else:
            with deadline(timeout):
                result = fn(**kwargs)
    except Overran:
        result = _TimedOut()
    except StopNow:
        raise
    except KeyboardInterrupt as err:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            raise  # no trainer owns Ctrl-C here (rloo eval, a notebook): the user's own interrupt
        result = _Exited(err)  # the trainer's handler never raises a plain one: the function did
    except SystemExit as err:
        result = _Exited(err)
    except Exception as err:  # noqa: BLE001 - found out sample by sample by the caller
        return err
    return _final(name, result, timeout, num_samples)


def _final(name: str, result, timeout: float | None, num_samples: int):
    if isinstance(result, _TimedOut):
        raise RewardFunctionError(f"reward function '{name}' did not return within reward_timeout = {timeout:g} s "
                                  f"(a batch of {num_samples} samples); make it faster, or raise reward_timeout")
    if isinstance(result, _Exited):
        err = result.error
        raise RewardFunctionError(f"reward function '{name}' raised {type(err).__name__}"
                                  f"{'(' + repr(err.args[0]) + ')' if err.args else ''}: a reward function must return "
                                  "its values (or raise an Exception), not end the process") from None
    return result


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
    timeout = getattr(sources, "timeout", None)
    for f in synchronous:
        results[f] = call_reward(sources.names[f], sources.fns[f], {**batch, **shared}, timeout, num_completions)
    if asynchronous:
        done = _await_all([functools.partial(sources.fns[f], **batch, **shared) for f in asynchronous], timeout)
        results.update((f, _final(sources.names[f], result, timeout, num_completions))
                       for f, result in zip(asynchronous, done))
    for f, result in sorted(results.items()):
        name, fn = sources.names[f], sources.fns[f]
        values = None
        if not isinstance(result, Exception):
            values = as_floats(name, result, num_completions)  # our own checks raise: the function's contract
        if values is None:
            values = _one_by_one(name, fn, batch, shared, on_error, errors, timeout)
        rewards_NF[:, f] = torch.tensor(values, dtype=torch.float32)
    return rewards_NF


def _call_one(name: str, fn, one: dict, shared: dict, timeout: float | None) -> Any:
    result = call_reward(name, fn, {**one, **shared}, timeout, 1)
    if isinstance(result, Exception):
        raise result
    return result


def _one_by_one(name, fn, batch: dict, shared: dict, on_error, errors, timeout=None) -> list[float]:
    """The function again, one sample at a time: NaN where it raises (isolate) or the first failure (raise)."""
    values = []
    completions = batch["completions"]
    for i in range(len(completions)):
        one = {key: [value[i]] for key, value in batch.items()}
        try:
            values += as_floats(name, _call_one(name, fn, one, shared, timeout), 1)
        except RewardFunctionError:
            raise  # overran or left the process: not one sample's failure
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
            if math.isfinite(number) and abs(number) > FLOAT32_MAX:
                logger.warning("reward function '%s' returned %g at index %d, beyond float32's range (%.1e), in "
                               "which rewards are kept: treated as non-finite (that source does not score the "
                               "sample)", name, number, i, FLOAT32_MAX)
                number = math.nan
            floats.append(number if math.isfinite(number) else math.nan)
        else:
            raise TypeError(
                f"reward function '{name}' returned {type(value).__name__} at index {i}; "
                "expected a real number or None"
            )
    return floats

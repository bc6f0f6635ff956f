"""Reward sources by name: rloo's built-ins, TRL's, a function by import path or file, a reward model.

Spec forms (``load_reward_fn``, ``build_rewards``), checked in this order:

- a built-in name (``rouge_l``, ``grounding``, ``no_repeated_bigrams``, ``summary_length``);
- a name of TRL's ``trl rloo`` script (``accuracy_reward``, ``reasoning_accuracy_reward``,
  ``think_format_reward``, ``get_soft_overlong_punishment``: the functions of ``trl.rewards``);
- ``package.module:function`` or ``path/to/file.py:function``;
- a local folder or a hub id (``org/name``): a sequence-classification reward model (TRL's meaning
  of a string in ``reward_funcs``);
- ``package.module.function``: TRL's script form, a module in the current directory included.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from rloo.rewards.builtin import grounding, no_repeated_bigrams, rouge_l, summary_length

BUILTIN_REWARDS = {
    "rouge_l": rouge_l,
    "grounding": grounding,
    "no_repeated_bigrams": no_repeated_bigrams,
    "summary_length": summary_length,
}
# The names `trl rloo --reward_funcs` takes, as TRL's script builds them (trl/scripts/rloo.py).
TRL_SCRIPT_REWARDS = {
    "accuracy_reward": lambda rewards: rewards.accuracy_reward,
    "reasoning_accuracy_reward": lambda rewards: rewards.reasoning_accuracy_reward,
    "think_format_reward": lambda rewards: rewards.think_format_reward,
    "get_soft_overlong_punishment": lambda rewards: rewards.get_soft_overlong_punishment(
        max_completion_len=1280, soft_punish_cache=256),
}

SPEC_FORMS = (f"a built-in name ({', '.join(BUILTIN_REWARDS)}), a TRL name ({', '.join(TRL_SCRIPT_REWARDS)}), "
              "'package.module.function', 'package.module:function', 'path/to/file.py:function', or a reward "
              "model folder or hub id")


def is_reward_model_spec(spec: str) -> bool:
    """A folder holding a model, or a hub id ``org/name`` that is neither a file nor an import path."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    return ":" not in spec and spec.count("/") == 1 and not spec.endswith(".py") and not spec.startswith((".", "/", "~"))


def load_reward_fn(spec: str) -> Any:
    """The reward function named by ``spec`` (any form above but a reward model). Errors are one line
    naming the spec (ValueError).

    >>> load_reward_fn("grounding").__name__
    'grounding'
    >>> load_reward_fn("rloo.rewards.builtin:summary_length").__name__
    'summary_length'
    >>> load_reward_fn("rloo.rewards.builtin.rouge_l").__name__
    'rouge_l'
    """
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if spec in TRL_SCRIPT_REWARDS:
        try:
            import trl.rewards
        except ImportError:
            raise ValueError(f"reward function '{spec}': it is TRL's; pip install trl") from None
        return TRL_SCRIPT_REWARDS[spec](trl.rewards)
    if ":" not in spec:
        if "." not in spec or "/" in spec or spec.endswith(".py"):
            raise ValueError(f"reward function '{spec}': expected {SPEC_FORMS}")
        target, attr = spec.rsplit(".", 1)  # TRL's dotted form; the current directory is importable, as in TRL
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        module, where = _import_module(spec, target), f"module '{target}'"
    else:
        target, _, attr = spec.rpartition(":")  # rpartition: a Windows path "C:\\x.py:fn" keeps its drive
        if not target or not attr:
            raise ValueError(f"reward function '{spec}': expected {SPEC_FORMS}")
        is_file = target.endswith(".py") or "/" in target or os.sep in target
        if not is_file and (target == "__main__" or "<" in attr):  # a script's or a nested function: not importable
            raise ValueError(f"reward function '{spec}' was a Python callable given to train(rewards=...), which cannot "
                             "be imported from here; name it by its file: --reward_funcs path/to/file.py:function")
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
            raise ValueError(f"reward function '{spec}': no module named '{name}' (a Python callable given to "
                             "train(rewards=...) is passed to rloo eval as --reward_funcs path/to/file.py:function)") from None
        raise ValueError(f"reward function '{spec}': importing '{name}' failed: {type(err).__name__}: {err}") from err
    except Exception as err:
        raise ValueError(f"reward function '{spec}': importing '{name}' failed: {type(err).__name__}: {err}") from err

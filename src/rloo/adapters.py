"""LoRA adapters (``use_peft`` with TRL's ``lora_*`` names, or ``train(peft_config=...)``), through transformers'
PEFT integration (``model.add_adapter``): the policy stays its transformers class with LoRA layers inside, so
every pass (generation, the shared-prompt log-probs, checkpoints) treats it as before; only the adapters
train. The reference policy is the same model with its adapters off: no second copy of the base weights."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import torch


def lora_config(cfg):
    """A ``peft.LoraConfig`` from the run's fields (TRL's ``ModelConfig`` names and defaults)."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules or None
    if targets == ["all-linear"]:
        targets = "all-linear"  # PEFT's word for every linear layer but the output one
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, modules_to_save=cfg.lora_modules_to_save or None,
                      task_type=cfg.lora_task_type)


def add_adapters(policy: torch.nn.Module, cfg, peft_config=None) -> bool:
    """Put LoRA adapters in ``policy`` when the run asks for them (``peft_config`` or ``use_peft``); the base
    weights are frozen. Returns whether it has adapters."""
    if peft_config is None and not cfg.use_peft:
        return False
    if importlib.util.find_spec("peft") is None:
        raise ValueError("use_peft: the peft package is not installed; pip install 'rloo[peft]'")
    from peft import PeftConfig

    if peft_config is not None and not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config: expected a peft.LoraConfig, got {type(peft_config).__name__}")
    if getattr(policy, "_hf_peft_config_loaded", False):
        raise ValueError("model: it already holds adapters; pass the base model and peft_config (or --use_peft)")
    try:
        policy.add_adapter(peft_config if peft_config is not None else lora_config(cfg))
    except ValueError as err:  # PEFT names the target modules it could not find
        raise ValueError(f"lora_target_modules: {' '.join(str(err).split())}") from None
    return True


def has_adapters(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "module", model), "_hf_peft_config_loaded", False))


@contextmanager
def adapters_off(model: torch.nn.Module):
    """The base model: ``model`` (or the module a DDP wrapper holds) with its adapters disabled, inside the block."""
    root = getattr(model, "module", model)
    root.disable_adapters()
    try:
        yield model
    finally:
        root.enable_adapters()

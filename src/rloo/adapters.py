"""LoRA adapters (``use_peft`` with TRL's ``lora_*`` names, or ``train(peft_config=...)``), through transformers'
PEFT integration (``model.add_adapter``): the policy stays its transformers class with LoRA layers inside, so
every pass (generation, the shared-prompt log-probs, checkpoints) treats it as before; only the adapters
train. The reference policy is the same model with its adapters off: no second copy of the base weights."""

from __future__ import annotations

import importlib.util
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch


def lora_config(cfg):
    """A ``peft.LoraConfig`` from the run's fields (TRL's ``ModelConfig`` names and defaults)."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules or None
    if targets == ["all-linear"]:
        targets = "all-linear"  # PEFT's word for every linear layer but the output one
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, modules_to_save=cfg.lora_modules_to_save or None,
                      task_type=cfg.lora_task_type)


def integrated(model: torch.nn.Module) -> torch.nn.Module:
    """A ``peft.PeftModel`` (``get_peft_model``) as the transformers model inside it, its adapters kept and seen
    by transformers' PEFT integration (as ``add_adapter`` leaves a model): rloo turns them off for the reference
    instead of copying the model. Any other model as it is."""
    if importlib.util.find_spec("peft") is None:
        return model
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    base = model.get_base_model()
    base.peft_config = dict(model.peft_config)
    base._hf_peft_config_loaded = True
    return base


def add_adapters(policy: torch.nn.Module, cfg, peft_config=None) -> bool:
    """Put LoRA adapters in ``policy`` when the run asks for them (``peft_config`` or ``use_peft``); the base
    weights are frozen. Returns whether it has adapters: its own ones count (a PeftModel, ``integrated``, or a
    model given ``add_adapter`` / ``load_adapter(..., is_trainable=True)``), when they have parameters to train."""
    if peft_config is None and not cfg.use_peft:
        if not has_adapters(policy):
            return False
        if not any(p.requires_grad for p in policy.parameters()):
            raise ValueError("model: its adapters are frozen (nothing would train); load them with "
                             "load_adapter(..., is_trainable=True), or pass the base model and peft_config")
        return True
    if importlib.util.find_spec("peft") is None:
        raise ValueError("use_peft: the peft package is not installed; pip install 'rloo[peft]'")
    from peft import PeftConfig

    if peft_config is not None and not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config: expected a peft.LoraConfig, got {type(peft_config).__name__}")
    if getattr(policy, "_hf_peft_config_loaded", False):
        raise ValueError("model: it already holds adapters, and use_peft / peft_config would add more; pass the base "
                         "model, or the model with its adapters and neither of them")
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


_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")
_BASE_LAYER = re.compile(r"(\.base_layer)+\.")  # nested when a module's parameters are wrapped one by one


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model`` with its active LoRA adapters merged in (W + scaling * B A), under the base
    model's own names, on the CPU (each merged on the model's device and moved at once, so the device holds one
    merged tensor at a time), a tied weight once: what vLLM loads and what a merged model folder holds.
    ``model`` is left as it is (PEFT's ``merge_and_unload`` would change it, and unmerging again does not give
    back W bit for bit)."""
    from peft.tuners.lora import LoraLayer

    root = getattr(model, "module", model)
    adapted: dict[int, list] = {}  # base tensor -> the (layer, adapter) pairs whose B A it takes
    for module in root.modules():
        if isinstance(module, LoraLayer) and not module.merged:
            # a layer's weight, or (ParamWrapper: experts) the parameter it names
            weight = getattr(module.get_base_layer(), getattr(module, "parameter_name", None) or "weight")
            adapted.setdefault(weight.data_ptr(), []).extend(
                (module, a) for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A)
    merged, seen = {}, set()
    with torch.no_grad():
        for key, tensor in root.state_dict().items():
            if ".lora_" in key or ".original_module." in key or tensor.data_ptr() in seen:
                continue  # the adapters themselves, the frozen originals of modules_to_save, a tied weight again
            seen.add(tensor.data_ptr())
            for module, adapter in adapted.get(tensor.data_ptr(), []):
                tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
            merged[_MODULES_TO_SAVE.sub(".", _BASE_LAYER.sub(".", key))] = tensor.detach().to("cpu")
    return merged


def save_adapter_folder(model: torch.nn.Module, folder: Path, base_name: str, merge: bool) -> None:
    """A LoRA run's model files in ``folder``: the adapter (adapter_model.safetensors, adapter_config.json, which
    names the base as the user gave it when that is a Hub id, so the folder loads anywhere); with ``merge``, the
    merged model (``merged_state_dict``, sharded as transformers shards) with the adapter in ``adapter/``."""
    from huggingface_hub import save_torch_state_dict

    from rloo.card import is_hub_id

    target = folder / "adapter" if merge else folder
    model.save_pretrained(target, safe_serialization=True)  # transformers' PEFT integration: the adapter only
    config_file = target / "adapter_config.json"
    if is_hub_id(base_name):  # not the local snapshot the base was loaded from
        values = json.loads(config_file.read_text(encoding="utf-8"))
        values["base_model_name_or_path"] = base_name
        config_file.write_text(json.dumps(values, indent=2, sort_keys=True), encoding="utf-8")
    if merge:
        save_torch_state_dict(merged_state_dict(model), folder)
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)

"""The precision of a run: float32 master weights and low-precision compute, as transformers' ``--bf16``.

transformers' and TRL's ``bf16`` / ``fp16`` mean mixed precision: forward passes run under autocast in
bf16 / fp16 while the trained weights, their gradients and AdamW's moments stay float32. Training
the weights themselves in bf16 loses every Adam update smaller than half a weight's spacing (bf16
keeps 8 significant bits: a weight of 0.02 moves in steps of 1.2e-4, so an update of 3e-6, the
rloo_tldr learning rate, rounds away; DESIGN.md §5 has the measurement). So the policy is upcast to
float32 for training whatever ``torch_dtype`` it was loaded in, unless ``pure_low_precision`` asks
for weights in that dtype. A reward model lives in the compute dtype, as inference does; the
reference policy in the dtype the policy computes from (``resolve_precision``).

``Precision`` holds the three dtypes; ``resolve_precision`` derives them from the config once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # the trained policy's parameters, gradients and AdamW state
    compute: torch.dtype | None  # autocast dtype of every forward pass; None: the weights' own
    frozen: torch.dtype  # the reference policy (never trained)

    @property
    def name(self) -> str:
        """For logs and the checkpoint fingerprint, e.g. 'float32 weights, bfloat16 compute'."""
        compute = _name(self.compute) if self.compute is not None else _name(self.weights)
        return f"{_name(self.weights)} weights, {compute} compute"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def mixed_precision_mode(cfg, cuda_available: bool) -> str:
    """accelerate's ``mixed_precision``: "bf16", "fp16" or "no", from ``bf16`` / ``fp16``.

    ``bf16`` None is TRL's default (on unless ``fp16``) where it pays: on a GPU with bf16 support.
    On a CPU it stays off unless asked for: bf16 autocast is slower than float32 on most CPUs."""
    if cfg.fp16 and cfg.bf16:
        raise ValueError("bf16 and fp16: choose one of them (both are true)")
    if cfg.fp16:
        if not cuda_available:
            raise ValueError("fp16: mixed precision in float16 needs a GPU (accelerate runs it on CUDA only and "
                             "would silently train in float32 here); on a CPU use --bf16 true")
        return "fp16"
    bf16 = cfg.bf16
    if bf16 is None:
        bf16 = cuda_available and torch.cuda.is_bf16_supported()
    return "bf16" if bf16 else "no"


def resolve_precision(cfg, mode: str, loaded: torch.dtype, casts_parameters: bool = False) -> Precision:
    """The dtypes of a run whose policy was loaded in ``loaded`` (``torch_dtype``, or the checkpoint's).

    The reference must compute as the policy does, or the KL at step 1 is numerical noise instead of 0:
    under autocast (one process, DDP) the policy computes from float32 weights, so the reference is held
    in the weights' dtype, as TRL's is (a bf16 copy differs by ~1e-2 per sequence of 40 tokens on a tiny
    model); where the strategy casts the parameters themselves (DeepSpeed, FSDP2), in the compute dtype."""
    compute = LOW.get(mode)
    if cfg.pure_low_precision:
        if loaded not in (torch.bfloat16, torch.float16):
            raise ValueError(f"pure_low_precision: the policy is {_name(loaded)}; it trains its weights in torch_dtype "
                             "itself, so set torch_dtype bfloat16 or float16 (or drop pure_low_precision)")
        weights = loaded
    else:
        weights = torch.float32
    return Precision(weights=weights, compute=compute, frozen=(compute or weights) if casts_parameters else weights)


def updates_lost_share(model: torch.nn.Module, learning_rate: float) -> float:
    """Share of the trainable weight elements that an update of ``learning_rate`` cannot change: AdamW
    moves each weight by about the learning rate, and a step below half the weight's spacing in its
    own dtype rounds back to the same value. 0.0 for float32 weights at any learning rate in use."""
    lost = total = 0
    for param in model.parameters():
        if not param.requires_grad or not param.is_floating_point():
            continue
        values = param.detach().abs().float()
        _, exponent = torch.frexp(values)  # values = m * 2**exponent, 0.5 <= m < 1
        spacing = torch.ldexp(torch.full_like(values, torch.finfo(param.dtype).eps), exponent - 1)
        lost += int(((learning_rate < spacing / 2) & (values > 0)).sum())
        total += values.numel()
    return lost / max(total, 1)


def warn_if_updates_vanish(model: torch.nn.Module, learning_rate: float, precision: Precision) -> float:
    """With ``pure_low_precision``: one warning when most updates would round away; the share lost."""
    if precision.weights == torch.float32:
        return 0.0
    share = updates_lost_share(model, learning_rate)
    if share > 0.5:
        logger.warning("pure_low_precision: learning_rate %g is below half the %s spacing of %.0f%% of the policy's "
                       "weights, so those updates round away and the run barely trains; drop pure_low_precision "
                       "(float32 master weights, bf16 compute with --bf16)", learning_rate,
                       _name(precision.weights), 100 * share)
    return share

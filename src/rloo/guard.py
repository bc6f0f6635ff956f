"""The check after every optimizer step: no parameter may be NaN or infinite.

A finite loss and gradient can still give non-finite weights (an update that overflows: a huge
learning rate or weight decay, weights already near the dtype's limit). ``UpdateGuard`` keeps the
parameters and the optimizer state as they were before the step (``take``) and, when the step left
any parameter non-finite, puts them back (``undo``): the step is then skipped exactly as one with a
non-finite gradient is (weights and Adam moments untouched, the schedule advances, counted in
``num_nonfinite_steps``). The copy goes to CPU memory (pinned, from a side stream on a GPU, so it runs
while the micro-batches' forward and backward passes do); the check is one fused max-abs reduction.

FSDP and DeepSpeed hold sharded parameters and optimizer state that rloo does not copy, and
``undo_nonfinite_updates false`` saves the copy's memory (three times the float32 weights, per
process): then the check runs and a non-finite result stops the run without saving those weights
(``undoable`` False; the newest checkpoint is the last good state).
"""

from __future__ import annotations

import contextlib
import math

import torch


class UpdateGuard:
    def __init__(self, model: torch.nn.Module, optimizer, undoable: bool):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.undoable = optimizer, undoable
        self.saved: tuple[list[torch.Tensor], dict] | None = None
        self.stream = None
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self) -> None:
        """Copy the parameters and optimizer state (nothing changes them until ``optimizer.step``)."""
        if not self.undoable:
            return
        cuda = self.params[0].is_cuda
        if cuda:
            self.stream = self.stream or torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext():
            params = [self._copy(("param", i), p.detach()) for i, p in enumerate(self.params)]
            state = self.optimizer.state_dict()
            state = {"state": {i: {k: self._copy(("state", i, k), v) if isinstance(v, torch.Tensor) else v
                                   for k, v in s.items()} for i, s in state["state"].items()},
                     "param_groups": [dict(group) for group in state["param_groups"]]}
        self.saved = (params, state)

    def _copy(self, key, tensor: torch.Tensor) -> torch.Tensor:
        """Into a buffer kept from step to step (pinned CPU memory for a GPU tensor: allocated once)."""
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda)
            self.buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        return buffer

    def ready(self) -> None:
        """Wait for the copy (before ``optimizer.step`` changes what it copies)."""
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
            self.stream.synchronize()

    def finite(self) -> bool:
        """This process's parameters, or its shards of them: FSDP2's local tensors, ZeRO-3's partitions
        (``ds_tensor``; the parameters themselves are empty between forwards)."""
        local = [getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p
                 for p in self.params]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in local]
        local = [t.detach() for t in local if t.numel() > 0]  # an empty shard has nothing to check (and no max)
        if not local:
            return True
        norms = torch._foreach_norm(local, math.inf)
        return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all().item())

    def undo(self) -> None:
        params, state = self.saved
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved, non_blocking=False)
        # Fresh tensors: load_state_dict keeps CPU tensors as they are, and the buffers are refilled next step.
        self.optimizer.load_state_dict({
            "state": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": state["param_groups"]})

    def release(self) -> None:
        self.saved = None


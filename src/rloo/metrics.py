"""Per-step metrics from a rollout and its update, and the sinks that write them (metrics.jsonl)."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch

from rloo.memory import peak_memory


def _mean(values: torch.Tensor) -> float | None:
    """The mean of the finite values; None (JSON null, never NaN) when there is none."""
    values = values[torch.isfinite(values)]
    return values.mean().item() if values.numel() else None


def step_metrics(step: int, samples: dict[str, torch.Tensor], k: int, sources, update: dict, seconds: float,
                 learning_rate: float) -> dict:
    """One JSON-able dict per optimizer step, without NaN: None where nothing was scorable.

    ``samples`` holds per-completion tensors of the whole step (every process): scores_B, rewards_BF,
    kl_B, lengths_B, truncated_B, advantages_B; ``update`` the step's loss, clip_ratio, entropy, grad_norm.
    """
    scores_B = samples["scores_B"]
    scores_PK = scores_B.view(-1, k)
    finite_PK = torch.isfinite(scores_PK)
    spread_P = torch.where(finite_PK, scores_PK, -math.inf).amax(1) - torch.where(finite_PK, scores_PK, math.inf).amin(1)
    scorable = scores_B[torch.isfinite(scores_B)]
    metrics = {
        "step": step,
        "reward": _mean(scores_B),
        "reward_std": scorable.std().item() if scorable.numel() > 1 else 0.0,
    }
    for f, name in enumerate(sources.names):
        metrics[f"rewards/{name}"] = _mean(samples["rewards_BF"][:, f])
    metrics.update({
        "kl": _mean(samples["kl_B"]),
        "entropy": update["entropy"],
        "completion_length": samples["lengths_B"].float().mean().item(),
        "frac_truncated": samples["truncated_B"].float().mean().item(),
        "frac_reward_zero_std": (~(spread_P > 0)).float().mean().item(),
        "num_unscorable": int((~torch.isfinite(scores_B)).sum()),
        "num_nonfinite_rewards": int((~torch.isfinite(samples["rewards_BF"])).sum()),  # None/NaN/inf/isolated errors
        "advantage_abs_mean": samples["advantages_B"].abs().mean().item(),
        # mean |log pi_sampler - log pi_train| per completion token (the decode loop's or vLLM's log-probs): a large
        # gap means the ratio is off 1 on-policy and clipping acts silently (bf16 kernels, a stale weight sync).
        "sampling_logprob_gap": update["logprob_gap_sum"] / max(update["num_tokens"], 1.0),
        "loss": update["loss"],
        "clip_ratio": update["clip_ratio"],
        "aux_loss": update.get("aux_loss"),
        "grad_norm": update["grad_norm"],
        "learning_rate": learning_rate,
        # completions trained on this step, over every process (a step that reuses a batch generates none)
        "episodes_per_s": update.get("num_sequences", len(scores_B)) / max(seconds, 1e-9),
        "step_seconds": seconds,
    })
    # A skipped step's NaN loss, say: null in metrics.jsonl, never NaN.
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in metrics.items()}


@contextmanager
def timed(timings: dict[str, float], phase: str, device: torch.device | None = None):
    """Adds the wall time of the ``with`` block to ``timings["time/<phase>"]`` (seconds) and, given the
    ``device``, its peak memory in MiB as ``timings["memory/<phase>"]`` (memory.py)."""
    start = time.perf_counter()
    try:
        with peak_memory(timings, phase, device) if device is not None else nullcontext():
            yield
    finally:
        key = f"time/{phase}"
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


class MetricsWriter:
    """Appends one JSON object per line (metrics.jsonl, completions.jsonl); only the main process writes.
    ``keep`` (resume): which lines of the file to keep (a killed run's lines after its checkpoint are not),
    the new lines appended after them; ``remember``: also hold the kept lines in ``kept`` (every process
    reads them)."""

    def __init__(self, path: Path, enabled: bool = True, keep: Callable[[dict], bool] | None = None,
                 remember: bool = True):
        self.kept: list[dict] = []
        self.file = None
        if not enabled and not remember:
            return
        tmp = path.with_name(path.name + ".tmp")  # the kept lines first, then swapped in whole
        out = open(tmp, "w", encoding="utf-8") if enabled else None
        try:
            if keep is not None and path.is_file():
                with open(path, encoding="utf-8") as old:
                    for line in old:  # streamed: completions.jsonl may be large
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:  # a line cut short by a kill
                            continue
                        if isinstance(row, dict) and keep(row):
                            if out is not None:
                                out.write(line if line.endswith("\n") else line + "\n")
                            if remember:
                                self.kept.append(row)
        finally:
            if out is not None:
                out.close()
        if enabled:
            os.replace(tmp, path)
            self.file = open(path, "a", encoding="utf-8")

    def write(self, metrics: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(metrics, allow_nan=False) + "\n")
            self.file.flush()

    def write_many(self, rows: list[dict]) -> None:
        if self.file is not None:
            self.file.write("".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

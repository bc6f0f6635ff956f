"""Peak memory of a phase: the most a process held at once inside a ``with`` block.

On CUDA, the most the tensors of this process took on its device (``torch.cuda.max_memory_allocated``, which
``reset_peak_memory_stats`` restarts); elsewhere, the peak resident set size of the process (Linux's VmHWM,
which writing 5 to /proc/self/clear_refs restarts, after glibc's ``malloc_trim`` has handed back the memory
freed before): weights, activations, the Python heap and all.
Where neither restarts (another OS), the peak since the process began."""

from __future__ import annotations

import ctypes
import resource
import sys
from contextlib import contextmanager

import torch

MIB = 2**20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:  # musl and others: no glibc malloc_trim
        return None


_LIBC = _libc()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    if _LIBC is not None:  # memory freed since but kept by the allocator would count as the next phase's
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # not Linux: peak_mib gives the process's peak so far


def peak_mib(device: torch.device) -> float:
    """The peak since ``reset_peak``, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / MIB if sys.platform == "darwin" else peak * 1024 / MIB


@contextmanager
def peak_memory(metrics: dict[str, float], phase: str, device: torch.device):
    """Sets ``metrics["memory/<phase>"]`` to the block's peak in MiB (the larger one when a phase repeats)."""
    reset_peak(device)
    try:
        yield
    finally:
        key = f"memory/{phase}"
        metrics[key] = round(max(metrics.get(key, 0.0), peak_mib(device)), 1)

"""Peak memory of a phase (memory.py): a block's peak holds what the block allocated, and the next block's
peak starts again from the memory held then (on a CPU: the process's resident set, restarted per block)."""

from __future__ import annotations

import sys

import pytest
import torch

from rloo.memory import peak_memory

MIB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-phase peak restarts through /proc (Linux)")
def test_a_phase_peak_holds_what_the_phase_allocated_and_the_next_phase_starts_again():
    device, metrics = torch.device("cpu"), {}
    with peak_memory(metrics, "small", device):
        torch.ones(MIB // 4).sum()  # 1 MiB
    with peak_memory(metrics, "large", device):
        block = torch.ones(256 * MIB // 4)  # 256 MiB, touched
        del block
    with peak_memory(metrics, "after", device):
        torch.ones(MIB // 4).sum()
    assert metrics["memory/large"] >= metrics["memory/small"] + 200
    assert metrics["memory/after"] <= metrics["memory/large"] - 200  # freed, handed back, and the peak restarted
    with peak_memory(metrics, "large", device):  # a phase that runs again in a step keeps its larger peak
        pass
    assert metrics["memory/large"] >= metrics["memory/after"] + 200

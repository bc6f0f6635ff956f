"""benchmarks/gpu_check.py's resolution (offline): what the GPU machine lacks, or has in a version rloo does not
accept or was not tested with, is carried, with what that needs in turn; what it has is not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from packaging.requirements import Requirement

SPEC = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_check)


def test_the_carry_set_holds_what_the_machine_lacks_and_what_it_needs_in_turn():
    needs = {"newpkg": [Requirement("dill>=0.3"), Requirement("torch"), Requirement("only-old; python_version<'3.9'")]}
    carry = gpu_check.carry_set([Requirement(text) for text in (
        "accelerate>=1.10,<2",  # the machine's 1.15.0: kept
        "safetensors>=0.9",  # the machine's 0.8.0 is too old: carried
        "transformers>=4.57,<5.20",  # the machine's 5.17.0, not the tested 5.19.0: carried at that version
        "newpkg>=1",  # missing: carried, with its own needs
        "bitsandbytes>=0.49",  # too large to travel: left out
    )], lambda name: needs.get(name, []))
    assert carry == {"safetensors": "safetensors>=0.9", "transformers": "transformers==5.19.0",
                     "newpkg": "newpkg>=1", "dill": "dill>=0.3"}


def test_rloos_own_requirements_carry_the_missing_packages_and_keep_the_machines_torch():
    carry = gpu_check.carry_set(gpu_check.requirements())
    assert {"datasets", "orjson", "rouge-score", "trl", "deepspeed", "peft", "transformers"} <= set(carry)
    assert not {"torch", "accelerate", "safetensors", "tokenizers", "huggingface-hub", "bitsandbytes"} & set(carry)

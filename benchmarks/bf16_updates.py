"""How many weights a short run at the rloo_tldr learning rate changes, by precision (the measurement behind
precision.py): the tldr-tiny policy, 5 steps at learning rate 3e-6 (constant), no evaluation.

    HF_HUB_OFFLINE=1 python benchmarks/bf16_updates.py [--steps 5] [--learning_rate 3e-6]

Runs float32 (weights and compute), bf16 mixed precision (--torch_dtype bfloat16 --bf16 true: float32 master
weights, bf16 autocast) and pure bf16 weights (--pure_low_precision true), and prints the share of weight
elements each changed, against its own starting weights (bf16-rounded for the two bf16 runs).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from rloo import load_config, train
from rloo.models import resolve_model_path

RUNS = {
    "float32": dict(torch_dtype="float32", bf16=False),
    "bf16 mixed precision": dict(torch_dtype="bfloat16", bf16=True),
    "pure bf16 weights": dict(torch_dtype="bfloat16", bf16=True, pure_low_precision=True),
}


def changed_share(start: dict, end: dict) -> float:
    changed = sum(int((start[key].float() != end[key].float()).sum()) for key in start)
    return changed / sum(t.numel() for t in start.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--learning_rate", type=float, default=3e-6)
    args = parser.parse_args()
    start = load_file(Path(resolve_model_path("rloo:tldr-tiny-sft")) / "model.safetensors")
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, precision) in enumerate(RUNS.items()):
            cfg = load_config("tldr-tiny", dict(max_steps=args.steps, learning_rate=args.learning_rate,
                                                lr_scheduler_type="constant", num_eval_samples=0, save_steps=0,
                                                disable_tqdm=True, output_dir=f"{folder}/run{index}", **precision))
            result = train(cfg)
            end = load_file(result.output_dir / "model.safetensors")
            own_start = start if precision["torch_dtype"] == "float32" else {
                key: tensor.to(torch.bfloat16) for key, tensor in start.items()}
            print(f"{name:<22} {100 * changed_share(own_start, end):5.1f}% of the weight elements changed "
                  f"(saved as {next(iter(end.values())).dtype})", flush=True)


if __name__ == "__main__":
    main()

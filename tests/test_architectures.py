"""rloo on every common architecture (tests/architectures.py: full and sliding-window attention, ALiBi,
logit soft-capping and scaling, mixture-of-experts with router logits, state-space and hybrid models).

Each architecture, built from a tiny random config whose every dropout rate is 0.1:
- its greedy completions, with the prompt shared and repeated, equal a plain no-cache greedy loop's over
  each prompt alone; so do its seeded samples (the same noise drawn by a plain loop: a random model's
  argmax can hide wrong logits, its samples cannot);
- its log-probs with the prompt repeated equal one plain forward per unpadded sequence, and those of its
  shared-prompt layout (whichever rloo chose for it) the repeated ones, within 1e-5, in training mode
  (so every dropout is off);
- it trains 2 steps through ``train()``, with a KL of 0 (1e-6) at step 1 and changed weights; MoE
  policies log the router's load-balancing loss, which is the same for the shared and the repeated pass.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from architectures import ARCHITECTURES, tiny_config
from rloo import RLOOConfig, train
from rloo.architecture import RouterLogits, architecture
from rloo.data import BUNDLED_DATASETS, left_pad, right_pad
from rloo.generation.hf import HFGenerator, sample_categorical
from rloo.checkpointing import enable_gradient_checkpointing
from rloo.logprobs import completion_logprobs, pass_layout, prompt_sharing
from rloo.models import disable_dropout

EOS, PAD = 0, 1
NUM_NEW = 8


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    """Three real TL;DR prompt ends of 20, 13 and 17 tokens: longer than the sliding window of 8."""
    lines = BUNDLED_DATASETS["rloo:tldr"]["validation"].read_text().splitlines()[:3]
    texts = [json.loads(line)["prompt"] for line in lines]
    return [tiny_tokenizer(text, add_special_tokens=False)["input_ids"][-n:] for text, n in zip(texts, (20, 13, 17))]


def build(name: str, tiny_tokenizer, folder=None):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32)
    if folder is not None:
        model.save_pretrained(folder, safe_serialization=True)
        tiny_tokenizer.save_pretrained(folder)
    return model


def token_reward(completion_ids, **kwargs):
    """A reward that differs between any two different completions of a random model (they rarely end early)."""
    return [float(sum(ids) % 17) + len(ids) for ids in completion_ids]


@torch.no_grad()
def plain_greedy(model, prompt: list[int]) -> list[int]:
    """The reference: a full forward over the bare prompt + tokens so far at every step, no cache, no padding."""
    ids = list(prompt)
    for _ in range(NUM_NEW):
        token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
        ids.append(token)
        if token == EOS:
            break
    return ids[len(prompt):]


@torch.no_grad()
def plain_sampling(model, prompt: list[int], k: int, seed: int) -> list[list[int]]:
    """k samples of one prompt by full forwards over each bare sequence, drawing the decode loop's noise: one
    (k, V) uniform draw per step from the prompt's own generator (generation.hf.sample_categorical)."""
    generator = torch.Generator().manual_seed(seed)
    rows, done = [list(prompt) for _ in range(k)], [False] * k
    for _ in range(NUM_NEW):
        logits_KV = torch.stack([model(input_ids=torch.tensor([row]), use_cache=False).logits[0, -1] for row in rows])
        tokens = sample_categorical(logits_KV.float().softmax(-1), [generator]).tolist()
        for i, token in enumerate(tokens):
            if not done[i]:
                rows[i].append(token)
                done[i] = token == EOS
        if all(done):
            break
    return [row[len(prompt):] for row in rows]


def plain_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([prompt + completion]), use_cache=False).logits[0].float() / temperature
    predicting = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]
    return predicting.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_generates_shares_prompts_and_trains(name, tiny_tokenizer, prompts, tmp_path, caplog):
    folder = tmp_path / "model"
    model = build(name, tiny_tokenizer, folder)
    disable_dropout(model)
    model.eval()
    expected = [plain_greedy(model, prompt) for prompt in prompts]
    for share in (True, False):
        generator = HFGenerator(model, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=NUM_NEW, do_sample=False,
                                share_prompt=share)
        out = generator.generate(prompts, 2)
        got = [row[mask.bool()].tolist() for row, mask in zip(out.completion_ids_BT, out.completion_mask_BT)]
        assert got == [e for e in expected for _ in range(2)], f"{name}: greedy tokens differ (share_prompt={share})"
        generator = HFGenerator(model, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=NUM_NEW, share_prompt=share)
        out = generator.generate(prompts, 3, seeds=[11, 12, 13])
        got = [row[mask.bool()].tolist() for row, mask in zip(out.completion_ids_BT, out.completion_mask_BT)]
        sampled = [s for prompt, seed in zip(prompts, (11, 12, 13)) for s in plain_sampling(model, prompt, 3, seed)]
        assert got == sampled, f"{name}: seeded samples differ (share_prompt={share})"
        # The decode loop's own log-probs of what it drew equal plain forwards over each sequence: a padding
        # token leaking into a state, or a lost window, moves logits by 1e-2, which tokens alone can hide.
        for row, completion in enumerate(got):
            torch.testing.assert_close(out.sampler_logprobs_BT[row, : len(completion)],
                                       plain_logprobs(model, prompts[row // 3], completion, 1.0), rtol=0, atol=1e-5,
                                       msg=f"{name}: decode-loop log-probs, row {row} (share_prompt={share})")

    # Shared and repeated log-probs, in training mode: with any dropout left on they would differ.
    model.train()
    completions = [expected[0], expected[0][:3], expected[1][:5], expected[1], expected[2][:1], expected[2]]
    batch = (*left_pad(prompts, PAD), *right_pad(completions, PAD))
    with caplog.at_level(logging.INFO, logger="rloo.logprobs"):
        shared, _ = completion_logprobs(model, *batch, temperature=0.7)
    repeated, _ = completion_logprobs(model, *batch, temperature=0.7, share_prompt=False)
    for row, completion in enumerate(completions):
        torch.testing.assert_close(repeated[row, : len(completion)], plain_logprobs(model, prompts[row // 2], completion, 0.7),
                                   rtol=0, atol=1e-5, msg=f"{name}: repeated-prompt log-probs, row {row}")
    torch.testing.assert_close(shared, repeated, rtol=0, atol=1e-5, msg=f"{name} ({prompt_sharing(model)})")
    if prompt_sharing(model) != "slots":  # the fallback says so, once, naming the architecture
        assert any(architecture(model).name in record.getMessage() for record in caplog.records)

    before = load_file(folder / "model.safetensors")
    result = train(RLOOConfig(
        model_name_or_path=str(folder), dataset_name="rloo:tldr", max_prompt_length=24, num_eval_samples=0,
        num_generations=2, per_device_train_batch_size=4, max_completion_length=6, max_steps=2, beta=0.1,
        learning_rate=1e-2, save_steps=0, output_dir=str(tmp_path / "run"), disable_tqdm=True, seed=0),
        rewards=token_reward)
    first = result.metrics[0]
    assert abs(first["kl"]) <= 1e-6, f"{name}: KL at step 1 is {first['kl']}"
    assert all(m["grad_norm"] is not None and m["grad_norm"] > 0 for m in result.metrics)
    after = load_file(result.output_dir / "model.safetensors")
    assert any(not torch.equal(before[key], after[key]) for key in before), f"{name}: no weight changed"
    if architecture(model).router is not None:
        assert all(m["aux_loss"] > 0 for m in result.metrics), f"{name}: no router load-balancing loss"
    # The saved folder keeps the model's own dropout rates (rloo turned them off for training only).
    saved = json.loads((result.output_dir / "config.json").read_text())
    assert all(value == 0.1 for key, value in saved.items() if isinstance(value, float) and "dropout" in key)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "jamba"])
def test_router_loss_counts_each_token_once_in_every_layout(name, tiny_tokenizer, prompts):
    """The load-balancing loss is taken over the real tokens, each prompt once: the shared-prompt pass and the
    repeated pass (where each prompt appears k times) give the same loss, and gradients reach the router."""
    model = build(name, tiny_tokenizer)
    disable_dropout(model)
    completions = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14], [15, 16], [17]]
    batch = (*left_pad(prompts, PAD), *right_pad(completions, PAD))
    losses = []
    for share in (True, False):
        router = RouterLogits(model)
        try:
            completion_logprobs(model, *batch, share_prompt=share, router=router)
            losses.append(router.loss())
        finally:
            router.close()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    losses[0].backward()
    router_grads = [p.grad for n, p in model.named_parameters() if ("gate" in n or "router" in n) and p.grad is not None]
    assert router_grads and any(g.abs().sum() > 0 for g in router_grads)


def test_router_aux_loss_coef_follows_trl(tiny_tokenizer):
    """None: the model config's coefficient; 0 turns the loss off; a coefficient on a model without router logits
    is an error naming the field (TRL's rules)."""
    from rloo.models import router_aux_loss_coef

    moe, dense = build("qwen3_moe", tiny_tokenizer), build("llama", tiny_tokenizer)
    assert router_aux_loss_coef(moe, None) == moe.config.router_aux_loss_coef > 0
    assert router_aux_loss_coef(moe, 0.0) == 0.0 and router_aux_loss_coef(moe, 0.5) == 0.5
    assert router_aux_loss_coef(dense, None) == 0.0
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.1: LlamaForCausalLM is not a mixture-of-experts"):
        router_aux_loss_coef(dense, 0.1)


def weighted_pass(model, batch, share: bool) -> tuple[torch.Tensor, tuple]:
    """The log-probs of a pass and the gradients of their weighted sum (weights -1..2 over the tokens)."""
    logprobs_BT, _ = completion_logprobs(model, *batch, share_prompt=share)
    weights_BT = torch.linspace(-1.0, 2.0, batch[2].numel()).view_as(batch[2])
    params = [p for p in model.parameters() if p.requires_grad]
    return logprobs_BT, torch.autograd.grad((logprobs_BT * weights_BT).sum(), params, allow_unused=True)


def training_setup(name: str, tiny_tokenizer, prompts) -> tuple[torch.nn.Module, tuple]:
    model = build(name, tiny_tokenizer)
    disable_dropout(model)
    model.train()
    completions = [[5, 6, 7, 8], [9, 10], [11], [12, 13, 14, 15, 16], [17, 18, 19], [20, 21]]
    return model, (*left_pad(prompts, PAD), *right_pad(completions, PAD))


def assert_same_gradients(model, got: tuple, want: tuple, label: str) -> None:
    """Each parameter's gradient within 1e-4 of the tensor's largest element, with a float32 floor of 1e-7."""
    for (param_name, _), mine, theirs in zip(model.named_parameters(), got, want):
        if theirs is None:
            assert mine is None or mine.abs().max() == 0, param_name
            continue
        bound = 1e-4 * theirs.abs().max().item() + 1e-7
        assert (mine - theirs).abs().max().item() <= bound, f"{label}: {param_name}"


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "mistral", "gemma2", "bloom", "falcon_alibi", "mamba2", "bamba",
                                  "falcon_h1", "qwen3_next", "lfm2"])
def test_shared_prompt_gradients_equal_the_repeated_prompts(name, tiny_tokenizer, prompts):
    """Autograd through the shared prompt (slots: one prompt cache; rows: the cache repeated, recurrent states
    updated by assignment): every parameter's gradient equals the repeated computation's."""
    model, batch = training_setup(name, tiny_tokenizer, prompts)
    _, shared = weighted_pass(model, batch, share=True)
    _, repeated = weighted_pass(model, batch, share=False)
    assert_same_gradients(model, shared, repeated, f"{name} ({prompt_sharing(model)})")


@pytest.mark.parametrize("name", ["gpt_neox", "llama", "qwen3_moe", "mistral", "gemma2", "bloom", "gpt2", "falcon_alibi",
                                  "mamba2", "bamba", "qwen3_next", "lfm2"])
def test_gradient_checkpointing_keeps_the_shared_prompt(name, tiny_tokenizer, prompts):
    """With gradient checkpointing on, the training pass still shares the prompt (each layer's replay in backward
    runs against the cache as its first run found it), and its log-probs (1e-5) and gradients equal the plain
    pass with the prompt repeated."""
    model, batch = training_setup(name, tiny_tokenizer, prompts)
    repeated_BT, repeated = weighted_pass(model, batch, share=False)
    num_columns = batch[0].shape[1] + batch[2].shape[1]
    plain_layout = pass_layout(model, True, 2, num_columns)
    enable_gradient_checkpointing(model)
    assert model.is_gradient_checkpointing
    layout = pass_layout(model, True, 2, num_columns)
    assert layout == plain_layout != "repeat"
    checkpointed_BT, checkpointed = weighted_pass(model, batch, share=True)
    assert (checkpointed_BT - repeated_BT).abs().max().item() <= 1e-5, f"{name} ({layout})"
    assert_same_gradients(model, checkpointed, repeated, f"{name} ({layout})")

"""Tests for rloo.models (loading, reference copy), rloo.logprobs (padded log-probs) and rloo.generation
(cut_at_eos, HFGenerator).

The log-prob tests compare the padded, grouped batch against one plain forward per unpadded
prompt + completion sequence: padding, position ids and the k-fold prompt repeat must change nothing.
"""

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from rloo.data import left_pad
from rloo.generation import cut_at_eos
from rloo.generation.hf import HFGenerator, sample_categorical
from rloo.hub import HubUnreachableError
from rloo.logprobs import completion_logprobs
from rloo.models import (
    eos_token_ids,
    frozen_copy,
    load_policy,
    load_tokenizer,
    resolve_model_path,
)
from rloo.data import right_pad

EOS, PAD = 0, 1

# P = 3 prompts of different lengths, k = 2 completions each (rows of one prompt adjacent), of
# different lengths too; one ends in EOS as real completions do.
PROMPTS = [[5, 17, 42, 99, 7], [300, 8], [60, 61, 62, 63, 64, 65, 66, 67]]
COMPLETIONS = [[11, 12, 13, EOS], [14], [200, 201, 202], [203, 204, 205, 206, 207, 208], [9, EOS], [400, 401, 402, 403]]
K = 2


@pytest.fixture
def policy(tiny_model_dir):
    """A fresh float32 copy of the tiny policy (tests may change its weights)."""
    model = load_policy(str(tiny_model_dir), torch_dtype="float32")
    model.eval()  # no dropout in GPT-NeoX defaults, but make the comparison independent of that
    return model


def padded_batch():
    prompt_ids_PL, prompt_mask_PL = left_pad(PROMPTS, PAD)
    completion_ids_BT, completion_mask_BT = right_pad(COMPLETIONS, PAD)
    return prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT


def unpadded_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log pi(y_t | x, y_<t) from one forward of the bare sequence x + y: the reference for the padded pass."""
    sequence = torch.tensor([prompt + completion])
    logits = model(input_ids=sequence).logits[0].float() / temperature
    # logits at position i predict token i + 1: the completion tokens are predicted from len(x)-1 on.
    predicting = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]
    return predicting.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


# ------------------------------------------------------------------------------------------ log-probs


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_match_unpadded_forward(policy, temperature, share_prompt):
    prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT = padded_batch()
    assert prompt_mask_PL[:, 0].tolist() == [0, 0, 1]  # left padding really happens
    with torch.no_grad():
        logprobs_BT, entropy_BT = completion_logprobs(
            policy, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT, temperature, with_entropy=True,
            share_prompt=share_prompt,
        )
    assert logprobs_BT.shape == entropy_BT.shape == completion_ids_BT.shape == (len(PROMPTS) * K, 6)
    for row, completion in enumerate(COMPLETIONS):
        with torch.no_grad():
            expected = unpadded_logprobs(policy, PROMPTS[row // K], completion, temperature)
        n = len(completion)
        torch.testing.assert_close(logprobs_BT[row, :n], expected, rtol=0, atol=1e-5)
        assert (logprobs_BT[row, :n] < 0).all()
        assert (logprobs_BT[row, n:] == 0).all()
        assert (entropy_BT[row, :n] > 0).all()
        assert (entropy_BT[row, n:] == 0).all()
    assert (entropy_BT >= 0).all()
    # a near-uniform random model: entropy close to, and never above, log(vocab)
    assert entropy_BT.max() <= torch.log(torch.tensor(float(policy.config.vocab_size))) + 1e-4


def test_temperature_changes_logprobs(policy):
    batch = padded_batch()
    with torch.no_grad():
        at_1, _ = completion_logprobs(policy, *batch, temperature=1.0)
        at_07, _ = completion_logprobs(policy, *batch, temperature=0.7)
    assert not torch.allclose(at_1, at_07)


def test_completion_logprobs_rejects_ragged_groups(policy):
    prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT = padded_batch()
    with pytest.raises(ValueError, match="not a multiple"):
        completion_logprobs(policy, prompt_ids_PL, prompt_mask_PL, completion_ids_BT[:5], completion_mask_BT[:5])


@pytest.mark.parametrize("share_prompt", [True, False])
def test_completion_logprobs_gradient_matches_unpadded(policy, share_prompt):
    params = [p for p in policy.parameters() if p.requires_grad]
    logprobs_BT, entropy_BT = completion_logprobs(policy, *padded_batch(), temperature=0.7, share_prompt=share_prompt)
    assert entropy_BT is None
    padded_grads = torch.autograd.grad(logprobs_BT.sum(), params, allow_unused=True)
    expected = sum(
        unpadded_logprobs(policy, PROMPTS[row // K], completion, 0.7).sum() for row, completion in enumerate(COMPLETIONS)
    )
    unpadded_grads = torch.autograd.grad(expected, params, allow_unused=True)
    num_compared = 0
    for (name, _), got, want in zip(policy.named_parameters(), padded_grads, unpadded_grads):
        if want is None:
            assert got is None or (got == 0).all(), name
            continue
        assert torch.isfinite(got).all(), name
        scale = want.abs().max().clamp(min=1e-12)
        assert ((got - want).abs().max() / scale).item() < 1e-4, name
        num_compared += 1
    assert num_compared >= len(params) - 1  # at most the input embedding of unused ids is skipped


def test_shared_prompt_equals_repeated_prompt(policy):
    """DESIGN.md §3: the prompt run once with its KV cache expanded k times gives the log-probs (abs 1e-5)
    and gradients (rel 1e-4) of the prompt repeated k times; per-token weights make the check sharp."""
    params = [p for p in policy.parameters() if p.requires_grad]
    batch = padded_batch()
    weights_BT = torch.linspace(-1.0, 2.0, batch[2].numel()).view_as(batch[2])
    results = {}
    for share in (True, False):
        logprobs_BT, _ = completion_logprobs(policy, *batch, temperature=0.7, share_prompt=share)
        results[share] = (logprobs_BT.detach(), torch.autograd.grad((logprobs_BT * weights_BT).sum(), params))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-5)
    for (name, _), shared, repeated in zip(policy.named_parameters(), results[True][1], results[False][1]):
        scale = repeated.abs().max().clamp(min=1e-12)
        assert ((shared - repeated).abs().max() / scale).item() < 1e-4, name


def test_logprobs_from_hidden_states_only_when_logits_are_the_plain_output_layer(policy, monkeypatch):
    """The shared pass feeds final hidden states to a chunked, checkpointed output layer (no (B, T, V)
    logits kept) when the model's logits are that layer's output; a model that scales its logits (as
    Gemma 2's soft-capping or Cohere's logit_scale do) gets the logits path, with the same results as
    repeating the prompt either way."""
    from transformers import GPTNeoXForCausalLM

    from rloo import logprobs as models

    class ScaledLogits(GPTNeoXForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    scaled = ScaledLogits(policy.config)
    scaled.load_state_dict(policy.state_dict())
    scaled.eval()
    used = []
    real = models.selective_logprobs_from_hidden
    monkeypatch.setattr(models, "selective_logprobs_from_hidden", lambda *a, **kw: used.append(1) or real(*a, **kw))
    batch = padded_batch()
    for model, fused in ((policy, True), (scaled, False)):
        used.clear()
        shared, _ = completion_logprobs(model, *batch, temperature=0.7, share_prompt=True)
        assert bool(used) is fused
        repeated, _ = completion_logprobs(model, *batch, temperature=0.7, share_prompt=False)
        torch.testing.assert_close(shared, repeated, rtol=0, atol=1e-5)
    assert not torch.allclose(completion_logprobs(policy, *batch)[0], completion_logprobs(scaled, *batch)[0])


# ------------------------------------------------------------------------------------------ reference model


def test_frozen_copy_holds_in_memory_weights_and_is_independent(policy, tiny_model_dir):
    weight = policy.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    with torch.no_grad():
        weight.add_(1.0)
    changed = weight.detach().clone()

    reference = frozen_copy(policy)
    ref_weight = reference.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    torch.testing.assert_close(ref_weight, changed, rtol=0, atol=0)  # not the weights on disk
    on_disk = load_policy(str(tiny_model_dir), torch_dtype="float32").gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    assert not torch.equal(ref_weight, on_disk)
    assert all(not p.requires_grad for p in reference.parameters())
    assert not reference.training
    assert all(p.requires_grad for p in policy.parameters())  # the policy itself stays trainable

    with torch.no_grad():
        weight.mul_(2.0)
        policy.get_output_embeddings().weight.zero_()
    torch.testing.assert_close(ref_weight, changed, rtol=0, atol=0)
    assert reference.get_output_embeddings().weight.abs().sum() > 0
    assert ref_weight.data_ptr() != weight.data_ptr()


def test_eos_token_ids(policy, tiny_tokenizer):
    assert eos_token_ids(policy, tiny_tokenizer) == [EOS]
    policy.generation_config.eos_token_id = [EOS, 7]
    assert eos_token_ids(policy, tiny_tokenizer) == [EOS, 7]


# ------------------------------------------------------------------------------------------ cut_at_eos


def test_cut_at_eos_hand_example():
    sequences_BT = torch.tensor(
        [
            [5, 6, EOS, 8, 9],  # EOS in the middle
            [EOS, 6, 7, 8, 9],  # EOS first: an empty completion that still ends
            [5, 6, 7, 8, 9],  # no EOS: truncated
            [5, 2, 7, 3, 9],  # second EOS id (2) comes first
            [5, 6, 7, 8, EOS],  # EOS as the last token
        ]
    )
    out = cut_at_eos(sequences_BT, [EOS, 2, 3], PAD)
    assert out.completion_ids_BT.tolist() == [
        [5, 6, EOS, PAD, PAD],
        [EOS, PAD, PAD, PAD, PAD],
        [5, 6, 7, 8, 9],
        [5, 2, PAD, PAD, PAD],
        [5, 6, 7, 8, EOS],
    ]
    assert out.completion_mask_BT.tolist() == [
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]
    assert out.truncated_B.tolist() == [False, False, True, False, False]
    assert out.completion_mask_BT.dtype == torch.long and out.truncated_B.dtype == torch.bool


# ------------------------------------------------------------------------------------------ HFGenerator


def greedy_reference(model, prompt: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    """Argmax decoding with one full forward per token: no cache, no padding."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax().item()
            sequence.append(token)
            if token in eos_ids:
                break
    return sequence[len(prompt):]


def test_hf_generator_shapes_masks_and_seed(policy):
    # Many EOS ids so that a random model ends some completions early and others not.
    eos_ids = list(range(0, 512, 9))
    generator = HFGenerator(policy, pad_token_id=PAD, eos_token_ids=eos_ids, max_new_tokens=12)
    prompts = PROMPTS
    torch.manual_seed(0)
    out = generator.generate(prompts, 4)
    ids_BT, mask_BT = out.completion_ids_BT, out.completion_mask_BT
    assert ids_BT.shape[0] == mask_BT.shape[0] == out.truncated_B.shape[0] == len(prompts) * 4
    assert ids_BT.shape == mask_BT.shape and ids_BT.shape[1] <= 12
    # cut_at_eos applied again changes nothing: masks are a prefix of ones ending at the first EOS.
    again = cut_at_eos(ids_BT, eos_ids, PAD)
    assert torch.equal(again.completion_ids_BT, ids_BT)
    assert torch.equal(again.completion_mask_BT, mask_BT)
    assert torch.equal(again.truncated_B, out.truncated_B)
    assert torch.equal(mask_BT.sum(1) == ids_BT.shape[1], mask_BT[:, -1] == 1)
    assert (ids_BT[mask_BT == 0] == PAD).all()
    lengths_B = mask_BT.sum(1)
    assert (lengths_B[out.truncated_B] == 12).all()  # truncated means it ran to max_new_tokens
    assert torch.isin(ids_BT[torch.arange(len(ids_BT)), lengths_B - 1][~out.truncated_B], torch.tensor(eos_ids)).all()
    assert out.truncated_B.any() and not out.truncated_B.all()  # both kinds occurred in this batch
    assert policy.training is False  # the fixture's mode is restored

    torch.manual_seed(0)
    same = generator.generate(prompts, 4)
    assert torch.equal(same.completion_ids_BT, ids_BT)
    torch.manual_seed(1)
    other = generator.generate(prompts, 4)
    assert not torch.equal(other.completion_ids_BT, ids_BT)


def test_hf_generator_restores_training_mode(policy):
    policy.train()
    generator = HFGenerator(policy, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=3)
    generator.generate([PROMPTS[0]], 2)
    assert policy.training


@pytest.mark.parametrize("max_new_tokens", [1, 7])
def test_hf_generator_greedy_matches_manual_loop(policy, max_new_tokens):
    generator = HFGenerator(policy, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=max_new_tokens,
                            do_sample=False)
    out = generator.generate(PROMPTS[:2], 1)  # two prompt lengths: the short one is left padded
    assert out.completion_ids_BT.shape == (2, max_new_tokens)
    for row in range(2):
        expected = greedy_reference(policy, PROMPTS[row], max_new_tokens, [EOS])
        length = int(out.completion_mask_BT[row].sum())
        assert out.completion_ids_BT[row, :length].tolist() == expected


def test_hf_generator_greedy_with_several_generations(policy):
    generator = HFGenerator(policy, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=4, do_sample=False)
    out = generator.generate(PROMPTS[:2], 2)
    assert out.completion_ids_BT.shape == (4, 4)
    assert torch.equal(out.completion_ids_BT[0], out.completion_ids_BT[1])  # greedy: the k copies agree


# ------------------------------------------------------------------------------------------ loading


def test_load_policy_offline_unknown_model_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as info:
        load_policy("nonexistent-org/nonexistent-model")
    message = str(info.value)
    assert "nonexistent-org/nonexistent-model" in message
    assert "\n" not in message


def test_load_policy_reads_the_saved_model(policy, tiny_model_dir):
    assert policy.config.hidden_size == 32 and policy.config.num_hidden_layers == 2
    assert policy.dtype == torch.float32
    assert policy.get_input_embeddings().weight.data_ptr() != policy.get_output_embeddings().weight.data_ptr()


def test_load_tokenizer_keeps_or_adds_a_pad_token(tiny_model_dir, tiny_tokenizer, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token_id == PAD and tokenizer.eos_token_id == EOS

    no_pad = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert no_pad.pad_token is None
    no_pad.save_pretrained(tmp_path / "no-pad")
    tokenizer = load_tokenizer(str(tmp_path / "no-pad"))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == EOS

    neither = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    neither.save_pretrained(tmp_path / "neither")
    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        load_tokenizer(str(tmp_path / "neither"))


def test_resolve_model_path():
    with pytest.raises(ValueError, match="rloo:unknown"):
        resolve_model_path("rloo:unknown")
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"
    assert resolve_model_path("/a/local/folder") == "/a/local/folder"


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(temperature=0.7),
                                      dict(temperature=1.3, top_k=20, top_p=0.9)])
def test_shared_prefill_generation_equals_repeated_prompts(policy, sampling):
    """DESIGN.md §3: prefilling each prompt once and repeating its KV cache k times samples exactly the
    tokens that prefilling the repeated prompts samples, for the same seed (float64 model; a fifth of
    the vocabulary counts as EOS so that rows stop early at different steps)."""
    model = policy.double()
    eos_ids = list(range(0, 512, 5))
    results = []
    for share in (True, False):
        generator = HFGenerator(model, pad_token_id=PAD, eos_token_ids=eos_ids, max_new_tokens=9,
                                share_prompt=share, **sampling)
        torch.manual_seed(11)
        results.append(generator.generate(PROMPTS, 4))
    shared, repeated = results
    assert shared.completion_ids_BT.shape == repeated.completion_ids_BT.shape
    assert torch.equal(shared.completion_ids_BT, repeated.completion_ids_BT)
    assert torch.equal(shared.completion_mask_BT, repeated.completion_mask_BT)
    assert torch.equal(shared.truncated_B, repeated.truncated_B)
    if sampling.get("do_sample", True):
        lengths = shared.completion_mask_BT.sum(1)
        assert lengths.min() < lengths.max()  # rows really stopped at different steps


@pytest.mark.parametrize("share", [True, False])
def test_greedy_decode_loop_equals_transformers_generate(policy, share):
    """The lean decode loop (in-place KV cache, positions after each prompt's own length) picks exactly
    the tokens of transformers' generate on the same left-padded prompts."""
    from transformers import GenerationConfig

    model = policy.double()
    prompt_ids_PL, prompt_mask_PL = left_pad(PROMPTS, PAD)
    # Two EOS ids taken from the greedy continuations (one row's 3rd token, another's 6th), so rows stop at different steps.
    free = HFGenerator(model, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=9, do_sample=False).generate(PROMPTS, 1)
    eos_ids = sorted({int(free.completion_ids_BT[0, 5]), int(free.completion_ids_BT[-1, 2])})
    out = HFGenerator(model, pad_token_id=PAD, eos_token_ids=eos_ids, max_new_tokens=9, do_sample=False,
                      share_prompt=share).generate(PROMPTS, 2)
    config = GenerationConfig(do_sample=False, max_new_tokens=9, eos_token_id=eos_ids, pad_token_id=PAD)
    with torch.no_grad():
        expected = model.generate(input_ids=prompt_ids_PL.repeat_interleave(2, 0),
                                  attention_mask=prompt_mask_PL.repeat_interleave(2, 0), generation_config=config)
    expected = cut_at_eos(expected[:, prompt_ids_PL.shape[1]:], eos_ids, PAD)
    assert torch.equal(out.completion_ids_BT, expected.completion_ids_BT)
    assert torch.equal(out.completion_mask_BT, expected.completion_mask_BT)
    lengths = out.completion_mask_BT.sum(1)
    assert lengths.min() < lengths.max()


def test_sample_categorical_draws_the_distribution():
    """The exponential race: frequencies match the probabilities (within 5 standard errors over 200k
    draws), zero-probability tokens are never drawn, unnormalised rows work, the seed fixes the draws."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.125, 0.125, 0.0])
    rows = probs.expand(200_000, -1) * 3.0  # rows need not sum to 1
    torch.manual_seed(0)
    draws = sample_categorical(rows)
    freq = torch.bincount(draws, minlength=len(probs)).double() / len(draws)
    se = (probs.double() * (1 - probs.double()) / len(draws)).sqrt()
    assert (freq[probs == 0] == 0).all()
    assert ((freq - probs.double()).abs() <= 5 * se + 1e-12).all()
    one_hot = torch.zeros(3, 5)
    one_hot[torch.arange(3), torch.tensor([4, 0, 2])] = 1.0
    assert sample_categorical(one_hot).tolist() == [4, 0, 2]
    torch.manual_seed(1)
    again = sample_categorical(rows[:1000])
    torch.manual_seed(1)
    assert torch.equal(sample_categorical(rows[:1000]), again)


def test_disable_dropout_makes_training_forwards_deterministic(tiny_tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from rloo.models import disable_dropout

    config = GPTNeoXConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, hidden_dropout=0.5, classifier_dropout=0.5)
    model = GPTNeoXForCausalLM(config).train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is really there
    disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_repetition_penalty_and_min_p_shape_sampling(policy):
    """TRL's repetition_penalty and min_p, with transformers' own processors: a huge penalty never repeats a
    token of the prompt or of the completion so far; min_p near 1 keeps only the top token (greedy)."""
    penalised = HFGenerator(policy, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=10, do_sample=False,
                            repetition_penalty=1e9).generate(PROMPTS, 1)
    for prompt, row, mask in zip(PROMPTS, penalised.completion_ids_BT, penalised.completion_mask_BT):
        tokens = row[mask.bool()].tolist()
        assert len(set(tokens)) == len(tokens) and not set(tokens) & set(prompt)
    greedy = HFGenerator(policy, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=10, do_sample=False)
    top_only = HFGenerator(policy, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=10, min_p=0.999999)
    torch.manual_seed(0)
    assert torch.equal(top_only.generate(PROMPTS, 2).completion_ids_BT, greedy.generate(PROMPTS, 2).completion_ids_BT)
    unshaped = HFGenerator(policy, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=10)
    torch.manual_seed(0)
    assert not torch.equal(unshaped.generate(PROMPTS, 2).completion_ids_BT, greedy.generate(PROMPTS, 2).completion_ids_BT)


def test_repetition_penalty_ignores_padding(policy):
    """The penalty counts a prompt's real tokens only: padded beside a longer prompt, a prompt continues as it
    does alone, even when the pad id is the very token it continues with (counted as seen, it would be barred)."""
    kwargs = dict(eos_token_ids=[EOS], max_new_tokens=6, do_sample=False, repetition_penalty=100.0)
    alone = HFGenerator(policy, pad_token_id=PAD, **kwargs).generate(PROMPTS[1:2], 1)
    first = int(alone.completion_ids_BT[0, 0])
    batched = HFGenerator(policy, pad_token_id=first, **kwargs).generate(PROMPTS, 1)
    assert batched.completion_ids_BT[1, 0].item() == first
    torch.testing.assert_close(batched.sampler_logprobs_BT[1, :1], alone.sampler_logprobs_BT[0, :1], rtol=0, atol=1e-6)


def test_an_unknown_built_in_model_is_one_line_naming_the_known_ones():
    from rloo.models import resolve_model_path

    with pytest.raises(ValueError, match=r"^model_name_or_path: unknown built-in model 'rloo:nope' \(known: "
                                         r"rloo:tldr-tiny-sft, rloo:tldr-tiny-base\)$"):
        resolve_model_path("rloo:nope")

"""What `rloo vllm-serve` accepts (generation/vllm_limits.py) and its readers-writer gate, without vLLM:
real safetensors bytes of a tiny policy, real JSON bodies, real asyncio tasks (seconds)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import save as save_safetensors

from rloo.generation.vllm_limits import (GenerationLimits, Refused, WeightLayout, authorized, check_api_key,
                                         is_loopback, state_dict_bytes)
from rloo.tiny import build_model

from conftest import TINY_RECIPE

SAMPLING = {"max_tokens", "stop_token_ids", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "greedy"}


@pytest.fixture(scope="module")
def policy(tiny_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits-policy")
    model = build_model(tiny_tokenizer, TINY_RECIPE, 0)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def refused(fn, *args) -> Refused:
    with pytest.raises(Refused) as info:
        fn(*args)
    assert "\n" not in info.value.message
    return info.value


def test_a_push_is_checked_whole_against_the_served_model(policy):
    model, folder = policy
    layout = WeightLayout.from_folder(folder, torch.float32, "tiny")
    good = state_dict_bytes(model)
    assert layout.check(good) == len(layout.expected) and len(good) <= layout.max_bytes
    tensors = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    first = next(iter(tensors))

    renamed = dict(tensors)
    renamed["gpt_neox.not_a_layer.weight"] = renamed.pop(first)
    assert refused(layout.check, save_safetensors(renamed)).status == 422
    missing = {k: v for k, v in tensors.items() if k != first}
    assert "missing" in refused(layout.check, save_safetensors(missing)).message
    reshaped = {**tensors, first: tensors[first][:-1]}
    assert "shape" in refused(layout.check, save_safetensors(reshaped)).message
    assert refused(layout.check, state_dict_bytes(model, torch.bfloat16)).status == 422  # the server holds float32
    assert WeightLayout.from_folder(folder, torch.bfloat16).check(state_dict_bytes(model, torch.bfloat16))

    header_size = int.from_bytes(good[:8], "little")
    for garbage in (b"", b"\x00" * 7, b"garbage bytes, not a safetensors file", good[:-1], good + b"\x00",
                    (10**12).to_bytes(8, "little") + good[8:], good[:8] + b"[" * header_size + good[8 + header_size:]):
        assert refused(layout.check, garbage).status == 400
    lying = json.loads(good[8:8 + header_size])  # two tensors claiming the same bytes
    names = [k for k in lying if k != "__metadata__"]
    lying[names[1]]["data_offsets"] = lying[names[0]]["data_offsets"]
    text = json.dumps(lying).encode().ljust(header_size)
    assert refused(layout.check, good[:8] + text + good[8 + header_size:]).status == 400


def test_a_tied_model_pushes_its_shared_tensor_once(tiny_tokenizer, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, tie_word_embeddings=True))
    model.save_pretrained(tmp_path, safe_serialization=True)
    layout = WeightLayout.from_folder(tmp_path, torch.float32)
    assert layout.check(state_dict_bytes(model)) == len(model.state_dict()) - 1  # lm_head is embed_in
    with pytest.raises(ValueError, match="no safetensors weights"):
        WeightLayout.from_folder(tmp_path / "nothing", torch.float32)


def test_generation_requests_are_bounded_by_the_engine():
    limits = GenerationLimits(max_model_len=64, vocab_size=100)
    assert limits.max_prompts == 4096 and limits.max_body_bytes < 3 << 20

    def body(**changes) -> bytes:
        values = {"prompt_ids": [[5, 6], [7]], "num_generations": 2, "seeds": [1, 2],
                  "sampling": {"max_tokens": 8, "stop_token_ids": [0], "temperature": 0.9}, **changes}
        return json.dumps(values).encode()

    job = limits.parse(body(), SAMPLING)
    assert job.prompt_ids == [[5, 6], [7]] and job.seeds == [1, 2] and job.weights_version is None
    assert limits.parse(body(weights_version=3), SAMPLING).weights_version == 3
    assert refused(limits.parse, b"{not json", SAMPLING).status == 400
    assert refused(limits.parse, b"[" * 100_000, SAMPLING).status == 400  # nested too deep for the parser
    bad = [dict(prompt_ids="abc"), dict(prompt_ids=[]), dict(prompt_ids=[[5, 100]]), dict(prompt_ids=[[-1]]),
           dict(prompt_ids=[[5.0]]), dict(prompt_ids=[[True]]), dict(prompt_ids=[list(range(60))]),
           dict(num_generations="2"), dict(num_generations=0), dict(num_generations=10**6), dict(seeds=[1]),
           dict(seeds=["1", "2"]), dict(weights_version=-1), dict(unknown=1),
           dict(sampling={"max_tokens": 64, "stop_token_ids": [0]}), dict(sampling={"stop_token_ids": [0]}),
           dict(sampling={"max_tokens": 8, "stop_token_ids": [0], "temperature": "hot"}),
           dict(sampling={"max_tokens": 8, "stop_token_ids": [0], "top_p": 0}),
           dict(sampling={"max_tokens": 8, "stop_token_ids": [0], "temperature": float("nan")}),
           dict(sampling={"max_tokens": 8, "stop_token_ids": [0], "greedy": 1}),
           dict(sampling={"max_tokens": 8, "stop_token_ids": [0], "beam_width": 4})]
    for change in bad:  # NaN: Python's json writes and reads it; the check refuses it
        assert refused(limits.parse, body(**change), SAMPLING).status == 422, change
    assert refused(limits.parse, json.dumps([1]).encode(), SAMPLING).status == 422
    many = GenerationLimits(max_model_len=64, vocab_size=100, max_prompts=2)
    assert refused(many.parse, body(prompt_ids=[[5]] * 3, seeds=None), SAMPLING).status == 413


def test_keys_and_addresses():
    assert authorized(None, None) and authorized("anything", None)
    assert authorized("Bearer s3cret", "s3cret") and authorized("bearer s3cret", "s3cret")
    assert not authorized(None, "s3cret") and not authorized("Bearer wrong", "s3cret")
    assert not authorized("s3cret", "s3cret") and not authorized("Bearer s3cre", "s3cret")
    assert not authorized("Bearer s3cr\xe9t", "s3cret")
    assert check_api_key("", "x") is None and check_api_key("abc", "x") == "abc"
    with pytest.raises(ValueError, match="printable ASCII"):
        check_api_key("caf\xe9", "--api_key")
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org", ""))


def test_weight_gate_lets_a_push_wait_for_generations_and_hold_new_ones():
    pytest.importorskip("fastapi")
    from rloo.generation.vllm_server import WeightGate

    async def scenario() -> list[str]:
        gate, order = WeightGate(), []
        first_in, release_first, push_waiting = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def generation(name: str, hold: asyncio.Event | None = None):
            async with gate.reading():
                order.append(f"{name} runs")
                if hold is not None:
                    first_in.set()
                    await hold.wait()
            order.append(f"{name} done")

        async def push():
            async with gate.writing():
                order.append("push loads")

        async def late_generation():
            await push_waiting.wait()
            await generation("late")

        first, late = asyncio.ensure_future(generation("first", release_first)), asyncio.ensure_future(late_generation())
        await first_in.wait()
        pushing = asyncio.ensure_future(push())
        while not gate.writers_waiting:  # the push is queued behind the generation in flight
            await asyncio.sleep(0)
        push_waiting.set()
        for _ in range(20):  # event-loop turns (not time): the late generation has had its chance to start
            await asyncio.sleep(0)
        order.append("first released")
        release_first.set()
        await asyncio.gather(first, pushing, late)
        return order

    order = asyncio.run(scenario())
    assert order == ["first runs", "first released", "first done", "push loads", "late runs", "late done"], order

"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny random GPT-NeoX policy saved to a folder.

Both are session scoped and built from the bundled TL;DR text in a few seconds, so CPU tests need no
hub and no cache. Tests that change a model load their own copy from ``tiny_model_dir``.
"""

import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / datasets read it at import
# Trackio reads its folder at import: the tests' local projects go to a temporary one, not ~/.cache.
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="rloo-tests-trackio-"))

import pytest

from rloo.data import BUNDLED_DATASETS
from rloo.tiny import build_model, build_tokenizer

TINY_VOCAB_SIZE = 512
TINY_NUM_TEXTS = 200
TINY_RECIPE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "rotary_pct": 0.25,
    "max_position_embeddings": 2048,
}
TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE, vocab 512, "<|endoftext|>" = 0 (bos = eos), "<|padding|>" = 1 (pad)."""
    lines = BUNDLED_DATASETS["rloo:tldr"]["train"].read_text().splitlines()[:TINY_NUM_TEXTS]
    rows = [json.loads(line) for line in lines]
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], TINY_VOCAB_SIZE)
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A folder with a random GPTNeoXForCausalLM (hidden 32, 2 layers, untied) and the tokenizer, safetensors only."""
    folder = tmp_path_factory.mktemp("tiny-policy")
    model = build_model(tiny_tokenizer, TINY_RECIPE, TINY_SEED)
    model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="session")
def tiny_policy_reward_model_dir(tmp_path_factory, tiny_tokenizer):
    """A random GPTNeoXForSequenceClassification (one label) with the policy's own tokenizer, so it can
    score the policy's token ids directly (RewardModel with ``policy_tokenizer``)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(1)
    config = GPTNeoXConfig(vocab_size=len(tiny_tokenizer), num_labels=1, tie_word_embeddings=False, **TINY_RECIPE)
    folder = tmp_path_factory.mktemp("tiny-reward-model")
    GPTNeoXForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder

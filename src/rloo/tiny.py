"""The tiny TL;DR policy of the ``tldr-tiny`` preset, built here because this machine class has no hub.

Recipe: a byte-level BPE tokenizer trained with ``tokenizers`` on the bundled TL;DR train text, a
pythia-architecture (GPTNeoX) model initialised at random, and a short supervised warm-up on the
bundled prompt -> reference-summary pairs (loss on completion tokens only) so that it writes TL;DR-like
text. The result is cached under ``$RLOO_CACHE`` (default ``~/.cache/rloo``) in a folder named by a
hash of the recipe, written atomically, so later runs start at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from rloo.data import BUNDLED_DATASETS, left_pad, right_pad, tokenize_prompts
from rloo.logprobs import completion_logprobs

logger = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|padding|>"

RECIPE = {
    "version": 1,
    "vocab_size": 8192,
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "rotary_pct": 0.25,
    "max_position_embeddings": 1024,
    "max_prompt_length": 256,
    "sft_steps": 200,
    "sft_batch_size": 16,
    "sft_learning_rate": 2e-3,
    "sft_warmup_steps": 20,
    "seed": 0,
}


def cache_root() -> Path:
    return Path(os.environ.get("RLOO_CACHE", Path.home() / ".cache" / "rloo")).expanduser()


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (the GPT-NeoX/Pythia kind) with Pythia's special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def build_model(tokenizer: PreTrainedTokenizerFast, recipe: dict, seed: int) -> GPTNeoXForCausalLM:
    """A pythia-architecture model at random init (untied embeddings, as Pythia)."""
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe["hidden_size"],
        num_hidden_layers=recipe["num_hidden_layers"],
        num_attention_heads=recipe["num_attention_heads"],
        intermediate_size=recipe["intermediate_size"],
        rotary_pct=recipe["rotary_pct"],
        max_position_embeddings=recipe["max_position_embeddings"],
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def supervised_warmup(model, tokenizer, rows: list[dict], recipe: dict) -> list[float]:
    """Teacher-forced cross-entropy on completion tokens (+ EOS) given the left-truncated prompt."""
    prompt_ids = tokenize_prompts([r["prompt"] for r in rows], tokenizer, recipe["max_prompt_length"]).input_ids
    completion_ids = [tokenizer(r["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                      for r in rows]
    generator = torch.Generator().manual_seed(recipe["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["sft_learning_rate"], weight_decay=0.01)
    steps, warmup = recipe["sft_steps"], recipe["sft_warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    order, losses = torch.empty(0, dtype=torch.long), []
    for step in range(steps):
        if len(order) < recipe["sft_batch_size"]:
            order = torch.cat([order, torch.randperm(len(rows), generator=generator)])
        batch, order = order[: recipe["sft_batch_size"]].tolist(), order[recipe["sft_batch_size"]:]
        prompt_ids_PL, prompt_mask_PL = left_pad([prompt_ids[i] for i in batch], tokenizer.pad_token_id)
        completion_ids_BT, completion_mask_BT = right_pad([completion_ids[i] for i in batch], tokenizer.pad_token_id)
        logprobs_BT, _ = completion_logprobs(model, prompt_ids_PL, prompt_mask_PL, completion_ids_BT, completion_mask_BT)
        loss = -logprobs_BT.sum() / completion_mask_BT.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info("tldr-tiny warm-up step %d/%d: completion loss %.3f", step + 1, steps, loss.item())
    model.eval()
    return losses


def recipe_hash(recipe: dict) -> str:
    data = BUNDLED_DATASETS["rloo:tldr"]["train"].read_bytes()
    blob = json.dumps(recipe, sort_keys=True).encode() + hashlib.sha256(data).digest()
    return hashlib.sha256(blob).hexdigest()[:12]


def ensure_tldr_tiny_policy(recipe: dict | None = None) -> Path:
    """The cached tiny TL;DR policy folder, built (about 2 minutes on 2 cores) if missing."""
    recipe = dict(RECIPE, **(recipe or {}))
    folder = cache_root() / f"tldr-tiny-sft-{recipe_hash(recipe)}"
    if (folder / "model.safetensors").exists():
        return folder
    start = time.time()
    logger.warning("building the tldr-tiny starting policy in %s (first run only)", folder)
    rows = [json.loads(line) for line in BUNDLED_DATASETS["rloo:tldr"]["train"].read_text().splitlines()]
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], recipe["vocab_size"])
    with torch.random.fork_rng():  # building leaves the caller's random state as it was
        model = build_model(tokenizer, recipe, recipe["seed"])
        losses = supervised_warmup(model, tokenizer, rows, recipe)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {"recipe": recipe, "final_loss": losses[-1], "build_seconds": round(time.time() - start, 1)}
    (tmp / "rloo_tiny_recipe.json").write_text(json.dumps(info, indent=2))
    try:
        tmp.rename(folder)  # atomic: a concurrent builder that won the race leaves its folder in place
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("tldr-tiny starting policy ready after %.0f s (final warm-up loss %.2f)", time.time() - start, losses[-1])
    return folder

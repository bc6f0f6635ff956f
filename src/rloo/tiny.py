"""The tiny TL;DR policy of the ``tldr-tiny`` preset, built here because this machine class has no hub.

Recipe: a byte-level BPE tokenizer trained with ``tokenizers`` on the bundled TL;DR train text and a
pythia-architecture (GPTNeoX) model initialised at random (the base, kept as ``tldr-tiny-base-<hash>``),
then supervised on the bundled prompt -> reference-summary pairs by ``rloo sft`` itself, run as a user
runs it (a child process, on the CPU, so the result is the same on every machine), into
``tldr-tiny-sft-<hash>``: an ``rloo sft`` run folder with its card and held-out completion loss. Both live
under ``$RLOO_CACHE`` (default ``~/.cache/rloo``), named by a hash of the recipe and the data, and appear
whole or not at all, so later runs start at once.

It reaches ``rloo sft`` through the command line and imports no stage, so ``models.resolve_model_path``
imports it with no circle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from rloo.data import BUNDLED_DATASETS

logger = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|padding|>"

RECIPE = {
    "version": 2,
    "vocab_size": 8192,
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "rotary_pct": 0.25,
    "max_position_embeddings": 1024,
    "seed": 0,
    # the rloo sft run (its command-line flags)
    "sft": {"max_steps": 300, "per_device_train_batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 20,
            "lr_scheduler_type": "cosine", "weight_decay": 0.01, "max_length": 1024, "num_eval_samples": 200,
            "gradient_checkpointing": "false"},  # TRL's default is on; a 3.3M-parameter model needs no memory saved
}

# The child runs alone: not as one more process of a distributed launch, and not on a GPU.
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                     "MASTER_PORT", "TORCHELASTIC_RUN_ID")


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


def recipe_hash(recipe: dict) -> str:
    data = b"".join(BUNDLED_DATASETS["rloo:tldr"][split].read_bytes() for split in ("train", "validation"))
    blob = json.dumps(recipe, sort_keys=True).encode() + hashlib.sha256(data).digest()
    return hashlib.sha256(blob).hexdigest()[:12]


def ensure_tldr_tiny_policy(recipe: dict | None = None) -> Path:
    """The cached tiny TL;DR policy folder (``rloo:tldr-tiny-sft``), built (about 3.5 minutes on 2 cores) if missing."""
    recipe = dict(RECIPE, **(recipe or {}))
    digest = recipe_hash(recipe)
    folder = cache_root() / f"tldr-tiny-sft-{digest}"
    if (folder / "model.safetensors").exists():
        return folder
    start = time.time()
    logger.warning("building the tldr-tiny starting policy in %s with rloo sft (first run only, about 3.5 minutes)",
                   folder)
    base = ensure_tldr_tiny_base(recipe)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        run_sft(base, staging / "run", recipe)
        install(staging / "run", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a failed build leaves nothing half made
    eval_json = folder / "eval.json"
    figures = json.loads(eval_json.read_text()) if eval_json.exists() else {}
    logger.warning("tldr-tiny starting policy ready after %.0f s (held-out completion loss %s -> %s)",
                   time.time() - start, _loss(figures.get("before")), _loss(figures.get("after")))
    return folder


def ensure_tldr_tiny_base(recipe: dict | None = None) -> Path:
    """The tokenizer and the random-init model that ``rloo sft`` starts from (``rloo:tldr-tiny-base``)."""
    recipe = {key: value for key, value in dict(RECIPE, **(recipe or {})).items() if key != "sft"}  # the base's part
    folder = cache_root() / f"tldr-tiny-base-{recipe_hash(recipe)}"
    if (folder / "model.safetensors").exists():
        return folder
    rows = [json.loads(line) for line in BUNDLED_DATASETS["rloo:tldr"]["train"].read_text().splitlines()]
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], recipe["vocab_size"])
    with torch.random.fork_rng():  # building leaves the caller's random state as it was
        model = build_model(tokenizer, recipe, recipe["seed"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "rloo_tiny_recipe.json").write_text(json.dumps({"recipe": recipe}, indent=2))
    install(tmp, folder)
    return folder


def install(built: Path, folder: Path) -> None:
    """``built`` renamed to ``folder`` (atomic); a concurrent builder that won the race keeps its folder."""
    try:
        built.rename(folder)
    except OSError:
        shutil.rmtree(built, ignore_errors=True)


def sft_command(base: Path, output_dir: Path, recipe: dict) -> list[str]:
    """``rloo sft`` on the bundled TL;DR pairs, as a user would type it."""
    flags = {"model_name_or_path": base, "dataset_name": "rloo:tldr", "dataset_eval_split": "validation",
             "seed": recipe["seed"], **recipe["sft"], "save_strategy": "no", "disable_tqdm": "true",
             "output_dir": output_dir}
    return [sys.executable, "-m", "rloo", "sft", *[part for key, value in flags.items()
                                                   for part in (f"--{key}", str(value))]]


def run_sft(base: Path, output_dir: Path, recipe: dict) -> None:
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCH_VARIABLES}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(sft_command(base, output_dir, recipe), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"building the tldr-tiny policy: rloo sft failed ({lines[-1]}); its command: "
                           f"{' '.join(sft_command(base, output_dir, recipe))}")


def _loss(figures: dict | None) -> str:
    return f"{figures['loss']:.3f}" if figures and "loss" in figures else "?"

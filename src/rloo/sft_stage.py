"""``sft(cfg)``: supervised fine-tuning (``rloo sft``), the first stage of the rloo_tldr recipe, in the shape
every stage shares (stage.py): TRL's SFTConfig fields, rows tokenized as TRL's SFTTrainer does
(sft_data.py), the mean negative log-likelihood of each step's trained tokens (sft_objective.py), and the
held-out completion loss before and after as the card's result."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from rloo.run import load_model
from rloo.sft_config import SFTConfig
from rloo.sft_data import SFTExamples, tokenize_sft
from rloo.sft_folder import save_sft_folder
from rloo.sft_objective import sft_batch, sft_loss
from rloo.stage import Stage, StageResult, opening, run_stage

SFTResult = StageResult


class SFTStage(Stage):
    name, unit = "sft", "tokens"

    def __init__(self, train: SFTExamples, held_out: SFTExamples | None):
        self.rows, self.held_rows = train, held_out
        self.train, self.held_out = train.examples, held_out.examples if held_out is not None else []

    def weight(self, items) -> int:
        return sum(sum(e.loss_mask[1:]) for e in items)

    def micro_loss(self, run, items, weight) -> torch.Tensor:
        batch = sft_batch(items, run.tokenizer.pad_token_id).to(run.accelerator.device)
        return sft_loss(run.policy, batch, weight)[0]

    @torch.no_grad()
    def evaluate(self, run) -> dict | None:
        """The mean negative log-likelihood per trained token of the held-out rows (the completion loss on
        prompt/completion rows) and its perplexity; the rows split over the processes."""
        if not self.held_out:
            return None
        accelerator = run.accelerator
        mine = self.held_out[accelerator.process_index::accelerator.num_processes]
        run.policy.eval()
        sums = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
        size = run.cfg.per_device_train_batch_size
        for start in range(0, len(mine), size):
            batch = sft_batch(mine[start:start + size], run.tokenizer.pad_token_id).to(accelerator.device)
            with accelerator.autocast():
                loss, _ = sft_loss(run.policy, batch, 1)
            sums += torch.tensor([loss.item(), batch.num_trained_tokens], device=sums.device, dtype=torch.float64)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, "sum")
        mean = (sums[0] / sums[1]).item()
        return {"loss": mean, "perplexity": math.exp(mean) if mean < 50 else float("inf"),
                "num_rows": len(self.held_out), "num_tokens": int(sums[1].item())}

    def fingerprint(self, run) -> dict:
        return {"num_trained_tokens": self.rows.num_trained_tokens}

    def write_folder(self, run, before, after, checkpoint, tracker_links) -> None:
        save_sft_folder(run, self.rows, before, after, checkpoint=checkpoint, tracker_links=tracker_links)


def sft(config: SFTConfig | None = None, *, model: str | torch.nn.Module | None = None, tokenizer: Any = None,
        train_dataset: Any = None, eval_dataset: Any = None) -> StageResult:
    """Supervised fine-tuning of a causal LM; TRL's ``SFTTrainer(model, args, train_dataset, eval_dataset,
    processing_class)`` maps to ``sft(args, model=..., train_dataset=..., tokenizer=...)``."""
    cfg = copy.deepcopy(config) if config is not None else SFTConfig()
    with opening(cfg, model, train_dataset, eval_dataset, "the model to fine-tune",
                 "the rows to train on (prompt/completion, messages or text), e.g. rloo:tldr") as start:
        policy, tokenizer, _, dropout = load_model(cfg, model, tokenizer)
        settings = dict(max_length=cfg.max_length, completion_only_loss=cfg.completion_only_loss,
                        assistant_only_loss=cfg.assistant_only_loss, dataset_text_field=cfg.dataset_text_field,
                        eos_token=cfg.eos_token)
        train = tokenize_sft(start.train_rows, tokenizer, **settings)
        if not train.examples:
            raise ValueError(f"max_length {cfg.max_length}: every training row is longer than that before its first "
                             "trained token, so none is left")
        stage = SFTStage(train, tokenize_sft(start.held_rows, tokenizer, **settings) if start.held_rows else None)
        first = start.train_rows[0]
        run = start.run(cfg, policy, tokenizer, len(train.examples), dropout, first.get("prompt", first.get("messages")))
    return run_stage(run, stage)

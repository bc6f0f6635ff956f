"""``reward_model(cfg)``: a Bradley-Terry reward model (``rloo reward-model``), the second stage of the
rloo_tldr recipe, in the shape every stage shares (stage.py): TRL's RewardConfig fields, pairs tokenized as
TRL's RewardTrainer does (preference_data.py), a sequence classifier with one label started from a causal
LM (its score head new, as the cleanrl recipe starts from the SFT policy), the pairwise loss
(reward_objective.py), and the held-out pairwise accuracy with its standard error as the card's result.
The run folder loads with AutoModelForSequenceClassification and as ``--reward_model_name_or_path``."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from rloo.hub import from_pretrained
from rloo.models import DTYPES, disable_dropout, load_tokenizer, resolve_model_path
from rloo.data import load_rows
from rloo.preference_data import PreferencePairs, tokenize_pairs
from rloo.reward_center import carrier, center, reference_sequences
from rloo.reward_config import RewardConfig
from rloo.reward_folder import save_reward_folder
from rloo.reward_objective import pair_scores
from rloo.stage import Stage, StageResult, opening, run_stage


class RewardStage(Stage):
    name, unit = "reward-model", "pairs"

    def __init__(self, train: PreferencePairs, held_out: PreferencePairs | None, center: float | None,
                 references: list[list[int]] | None = None):
        self.rows, self.held_rows, self.center, self.references = train, held_out, center, references
        self.train, self.held_out = self._items(train), self._items(held_out)

    @staticmethod
    def _items(pairs: PreferencePairs | None) -> list[tuple]:
        if pairs is None:
            return []
        margins = pairs.margins or [None] * len(pairs.chosen_ids)
        return list(zip(pairs.chosen_ids, pairs.rejected_ids, margins))

    def weight(self, items) -> int:
        return len(items)

    def _pair_losses(self, run, items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r_chosen, r_rejected = pair_scores(run.policy, [i[0] for i in items], [i[1] for i in items],
                                           run.tokenizer.pad_token_id, run.accelerator.device)
        margin = torch.tensor([i[2] or 0.0 for i in items], device=r_chosen.device)
        losses = -F.logsigmoid(r_chosen - r_rejected - margin)
        if self.center is not None:  # TRL: coefficient * mean((r_c + r_r)^2) per micro-batch
            losses = losses + self.center * (r_chosen + r_rejected) ** 2
        return losses, r_chosen, r_rejected

    def micro_loss(self, run, items, weight) -> torch.Tensor:
        return self._pair_losses(run, items)[0].sum() / weight

    @torch.no_grad()
    def evaluate(self, run) -> dict | None:
        """Held-out pairwise accuracy (chosen scored strictly higher) with its standard error, the loss and the
        mean scores; the pairs split over the processes."""
        if not self.held_out:
            return None
        accelerator = run.accelerator
        mine = self.held_out[accelerator.process_index::accelerator.num_processes]
        run.policy.eval()
        sums = torch.zeros(5, device=accelerator.device, dtype=torch.float64)  # n, correct, loss, chosen, rejected
        for start in range(0, len(mine), run.cfg.per_device_train_batch_size):
            part = mine[start:start + run.cfg.per_device_train_batch_size]
            with accelerator.autocast():
                losses, r_chosen, r_rejected = self._pair_losses(run, part)
            sums += torch.tensor([len(part), (r_chosen > r_rejected).sum().item(), losses.sum().item(),
                                  r_chosen.sum().item(), r_rejected.sum().item()], device=sums.device, dtype=torch.float64)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, "sum")
        n, correct, loss, chosen, rejected = sums.tolist()
        accuracy = correct / n
        return {"accuracy": accuracy, "accuracy_se": (accuracy * (1 - accuracy) / n) ** 0.5, "loss": loss / n,
                "mean_chosen": chosen / n, "mean_rejected": rejected / n, "num_pairs": int(n)}

    def write_folder(self, run, before, after, checkpoint, tracker_links) -> None:
        if self.references is not None:  # the final model, centered on the reference completions (N+)
            shift = center(run.accelerator.unwrap_model(run.policy), self.references, run.tokenizer.pad_token_id,
                           run.accelerator.device, run.cfg.per_device_train_batch_size)
            if after is not None:
                offset = shift["reference_mean_before"] - shift["reference_mean_after"]
                after.update(mean_chosen=after["mean_chosen"] - offset, mean_rejected=after["mean_rejected"] - offset)
                after["centering"] = {"dataset": run.cfg.center_rewards_dataset, **shift}
        save_reward_folder(run, self.rows, before, after, checkpoint=checkpoint, tracker_links=tracker_links)


def load_reward_base(cfg: RewardConfig, model, tokenizer):
    """The sequence classifier (one label) to train: a model given, or ``model_name_or_path`` loaded with a new
    score head (seeded) when it is a causal LM; its tokenizer with a pad token written into its config."""
    if model is None or isinstance(model, str):
        path = resolve_model_path(model or cfg.model_name_or_path)
        torch.manual_seed(cfg.seed)  # the new score head: the same every run of this seed
        extra = dict(cfg.model_init_kwargs or {})
        extra.pop("dtype", None)
        model = from_pretrained(AutoModelForSequenceClassification, path, "reward model", num_labels=1,
                                dtype=DTYPES.get(cfg.torch_dtype, "auto"), trust_remote_code=cfg.trust_remote_code,
                                use_safetensors=True, **extra)
        tokenizer = tokenizer or load_tokenizer(path, cfg.trust_remote_code, revision=cfg.model_revision)
    elif getattr(model.config, "num_labels", None) != 1:
        raise ValueError(f"model: a reward model has one label (num_labels=1); this one has {model.config.num_labels}")
    if tokenizer is None:
        raise ValueError("tokenizer: give the model's tokenizer with reward_model(model=..., tokenizer=...)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # where transformers reads each row's last real token
    dropout = disable_dropout(model) if cfg.disable_dropout else {}
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={**(cfg.gradient_checkpointing_kwargs or {}),
                                                                           "use_reentrant": False})
    return model, tokenizer, dropout


def reward_model(config: RewardConfig | None = None, *, model: str | torch.nn.Module | None = None,
                 tokenizer: Any = None, train_dataset: Any = None, eval_dataset: Any = None) -> StageResult:
    """Train a Bradley-Terry reward model; TRL's ``RewardTrainer(model, args, train_dataset, eval_dataset,
    processing_class)`` maps to ``reward_model(args, model=..., train_dataset=..., tokenizer=...)``."""
    cfg = copy.deepcopy(config) if config is not None else RewardConfig()
    with opening(cfg, model, train_dataset, eval_dataset, "the model to start from (a causal LM or a sequence "
                 "classifier)", "{prompt, chosen, rejected} pairs, e.g. rloo:tldr-preference") as start:
        scorer, tokenizer, dropout = load_reward_base(cfg, model, tokenizer)
        references = None
        if cfg.center_rewards_dataset is not None:  # everything centering needs, checked before training
            carrier(scorer)  # a model whose weights cannot hold the offset
            rows = load_rows(cfg.center_rewards_dataset, "train")
            rows = rows.select(range(min(cfg.num_center_samples, len(rows))))
            references = reference_sequences(rows, tokenizer, cfg.max_length, cfg.eos_token or tokenizer.eos_token)
            if not references:
                raise ValueError(f"center_rewards_dataset: no row of '{cfg.center_rewards_dataset}' fits max_length "
                                 f"{cfg.max_length}")
        train = tokenize_pairs(start.train_rows, tokenizer, cfg.max_length, cfg.eos_token)
        if not train.chosen_ids:
            raise ValueError(f"max_length {cfg.max_length}: every training pair is longer than that")
        held_out = tokenize_pairs(start.held_rows, tokenizer, cfg.max_length, cfg.eos_token) if start.held_rows else None
        stage = RewardStage(train, held_out, cfg.center_rewards_coefficient, references)
        run = start.run(cfg, scorer, tokenizer, len(stage.train), dropout, start.train_rows[0])
    return run_stage(run, stage)

"""``RewardConfig``: the options of ``rloo reward-model``, TRL's RewardConfig names and defaults where TRL has
the field (learning rate 1e-4, max_length 1024 as a filter, disable_dropout, center_rewards_coefficient),
over the same model, training, run-folder and reporting sections as every stage."""

from __future__ import annotations

from dataclasses import dataclass

from rloo.config import Config, Schema, check_stage
from rloo.schema import CommonDataArgs, ModelArgs, ReportArgs, StageRunArgs, TrainingArgs, arg


@dataclass
class RewardDataArgs(CommonDataArgs):
    max_length: int | None = arg(
        1024, "Pairs whose chosen or rejected sequence is longer than this many tokens are left out (TRL's rule: "
        "the score is read at the last token, which truncation would cut). None: no limit.",
    )
    eos_token: str | None = arg(None, "The token appended to plain-text chosen and rejected; None: the tokenizer's EOS.")
    center_rewards_coefficient: float | None = arg(
        None, "Weight of mean((r_chosen + r_rejected)^2) in the loss, keeping scores near 0 (TRL's name; its docs "
        "suggest 0.01). None: off.",
    )
    center_rewards_dataset: str | None = arg(
        None, "After training, subtract the mean score of these rows' prompt + completion (the reference completions, "
        "e.g. rloo:tldr's summaries; the N+ recipe), folded into the weights so that any loader scores them 0 on "
        "average. None: off.",
    )
    num_center_samples: int = arg(1000, "The first this many rows of center_rewards_dataset's train split are scored.")
    num_eval_samples: int = arg(200, "Held-out pairs whose accuracy is measured before and after training (0: off).")


@dataclass
class RewardTrainingArgs(TrainingArgs):
    learning_rate: float = arg(1e-4, "AdamW peak learning rate (TRL's RewardConfig default).")


REWARD_SECTIONS: dict[str, type] = {"model": ModelArgs, "data": RewardDataArgs, "training": RewardTrainingArgs,
                                    "run": StageRunArgs, "report": ReportArgs}


class RewardConfig(Config):
    """All options of a reward-model run (``rloo reward-model``), TRL's RewardConfig names."""

    SCHEMA = Schema(REWARD_SECTIONS, {})
    STAGE = "reward-model"  # a run folder's default name: runs/reward-model-<time>

    def resolve(self) -> None:
        """Validate every field; errors are one line naming the field."""
        check_stage(self, "reward-model", [
            (self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
             "center_rewards_coefficient must be >= 0 or None"),
            (self.num_center_samples >= 1, "num_center_samples must be >= 1"),
        ])

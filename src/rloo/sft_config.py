"""``SFTConfig``: the options of ``rloo sft``, TRL's SFTConfig names and defaults where TRL has the field
(learning rate 2e-5, max_length 1024, logging every 10 steps, completion_only_loss auto), and the same
model, training, run-folder and reporting fields as ``rloo train`` (one shape for every stage)."""

from __future__ import annotations

from dataclasses import dataclass

from rloo.config import Config, Schema, check_stage
from rloo.schema import CommonDataArgs, ModelArgs, ReportArgs, StageRunArgs, TrainingArgs, arg


@dataclass
class SFTDataArgs(CommonDataArgs):
    dataset_text_field: str = arg("text", "The column of plain-text rows (TRL's name).")
    max_length: int | None = arg(
        1024, "Tokens kept per row, from the start (TRL's keep_start: the end of a long completion is cut); a row "
        "left with no trained token is dropped. None: no limit.",
    )
    truncation_mode: str = arg("keep_start", "TRL's name; only keep_start (keep_end is deprecated there).")
    completion_only_loss: bool | None = arg(
        None, "Train on the completion only (prompt/completion rows). None: on for prompt/completion rows (TRL's "
        "rule).",
    )
    assistant_only_loss: bool = arg(
        False, "Train on the assistant turns only (conversational rows; the chat template's {% generation %} "
        "markers say where they are).",
    )
    eos_token: str | None = arg(None, "The token appended to plain-text completions; None: the tokenizer's EOS.")
    packing: bool = arg(False, "TRL's field; only false for now (each row is its own sequence, right padded).")
    num_eval_samples: int = arg(
        200, "Held-out rows whose completion loss is measured before and after training (0 turns evaluation off)."
    )


@dataclass
class SFTModelArgs(ModelArgs):
    disable_dropout: bool = arg(False, "Set every dropout probability to 0 (TRL's SFTTrainer keeps the model's own).")


@dataclass
class SFTTrainingArgs(TrainingArgs):
    learning_rate: float = arg(2e-5, "AdamW peak learning rate (TRL's SFTConfig default).")


SFT_SECTIONS: dict[str, type] = {"model": SFTModelArgs, "data": SFTDataArgs, "training": SFTTrainingArgs,
                                 "run": StageRunArgs, "report": ReportArgs}
SFT_NOT_YET = {
    "packing_strategy": "rloo sft does not pack yet (packing false): each row is its own sequence",
    "padding_free": "rloo sft does not pack yet (packing false): each row is its own sequence",
    "loss_type": "rloo sft trains with TRL's nll loss",
}


class SFTConfig(Config):
    """All options of a supervised run (``rloo sft``): ``SFTConfig(learning_rate=1e-4, max_length=512)``, TRL's
    names; ``cfg.model``, ``cfg.data``... hold the sections."""

    SCHEMA = Schema(SFT_SECTIONS, SFT_NOT_YET)
    STAGE = "sft"  # a run folder's default name: runs/sft-<time>

    def resolve(self) -> None:
        """Validate every field; errors are one line naming the field."""
        check_stage(self, "sft", [
            (self.truncation_mode == "keep_start", f"truncation_mode: only keep_start, got {self.truncation_mode!r}"),
            (not self.packing, "packing: rloo sft does not pack rows yet; set packing false"),
        ])

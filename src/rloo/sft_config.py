"""``SFTConfig``: the options of ``rloo sft``, TRL's SFTConfig names and defaults where TRL has the field
(learning rate 2e-5, max_length 1024, logging every 10 steps, completion_only_loss auto), and the same
model, training, run-folder and reporting fields as ``rloo train`` (one shape for every stage)."""

from __future__ import annotations

from dataclasses import dataclass

from rloo.config import Config, Schema
from rloo.schema import PRESET_HELP, CommonDataArgs, CommonRunArgs, ModelArgs, ReportArgs, TrainingArgs, arg


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


@dataclass
class SFTRunArgs(CommonRunArgs):
    logging_steps: int = arg(10, "Write metrics every this many steps (TRL's default).")
    preset: str | None = arg(*PRESET_HELP)


SFT_SECTIONS: dict[str, type] = {"model": SFTModelArgs, "data": SFTDataArgs, "training": SFTTrainingArgs,
                                 "run": SFTRunArgs, "report": ReportArgs}
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
        checks = [
            (self.max_length is None or self.max_length >= 2, "max_length must be >= 2 or None"),
            (self.truncation_mode == "keep_start", f"truncation_mode: only keep_start, got {self.truncation_mode!r}"),
            (not self.packing, "packing: rloo sft does not pack rows yet; set packing false"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.max_steps > 0 or self.num_train_epochs > 0, "max_steps or num_train_epochs must be > 0"),
            (self.logging_steps >= 1, "logging_steps must be >= 1"),
            (self.save_steps >= 0, "save_steps must be >= 0 (0 = no checkpoints)"),
            (self.num_eval_samples >= 0, "num_eval_samples must be >= 0"),
            (self.save_strategy in ("steps", "no"), f"save_strategy must be steps or no, got {self.save_strategy!r}"),
            (not self.use_peft and not (self.load_in_4bit or self.load_in_8bit),
             "use_peft / load_in_4bit / load_in_8bit: rloo sft trains the whole model for now"),
            (not self.log_completions, "log_completions: rloo sft generates no completions"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.save_strategy == "no" and self.save_steps:
            self.set("save_steps", 0, "save_strategy")

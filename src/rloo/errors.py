"""The errors rloo raises on purpose: each message is one line naming what failed and what to do."""

from __future__ import annotations

from pathlib import Path


def one_line(err: BaseException, with_type: bool = False) -> str:
    """An exception's message on one line (whitespace folded), its class name when it has none;
    ``with_type``: always prefixed by the class name."""
    text = " ".join(str(err).split())
    if with_type:
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text or type(err).__name__


class RlooError(RuntimeError):
    """Base of rloo's own runtime errors (config and data errors are ValueError / TypeError)."""


class CheckpointError(RlooError):
    """A checkpoint could not be written or read."""


class RewardFunctionError(RlooError):
    """A reward function raised; the message names it and the first sample it fails on."""


class GenerationServerError(RlooError):
    """The generation server (``rloo vllm-serve``) is unreachable, failed a request or restarted."""


class NonFiniteTrainingError(RlooError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, without finishing the step (no checkpoint of it)."""


class NonFiniteWeightsError(NonFiniteTrainingError):
    """An update left non-finite weights that could not be undone (FSDP / DeepSpeed, or
    undo_nonfinite_updates false): the run stops without saving them."""


class TrainingInterrupted(RlooError):
    """SIGINT or SIGTERM arrived: the step in progress finished and a checkpoint was written."""

    exit_code = 75  # rloo train's exit status then (EX_TEMPFAIL: resume with --resume_from_checkpoint latest)

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None):
        super().__init__(f"{signal_name} received: stopped after step {step}; checkpoint {checkpoint}; continue with "
                         "--resume_from_checkpoint latest")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class RunFolderError(RlooError):
    """The output_dir is held by another run, or holds an earlier run a fresh one would mix with."""


class FinalWriteError(RlooError):
    """The final model folder could not be written; the trained weights are in the checkpoint named."""


class TrackerError(RlooError):
    """A tracker of report_to could not be opened (the run stops before training)."""

"""Where a run's figures go, on the main process: metrics.jsonl, completions.jsonl, the console, the trackers
(trackers.py) and the Hub (publish.py). The loop hands it each step's metrics and, on logged steps, its
completions; it decides what goes where."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from rloo.distributed import raise_on_every_process
from rloo.errors import TrackerError
from rloo.metrics import MetricsWriter
from rloo.report import prompt_text
from rloo.rollout import Rollout
from rloo.trackers import Trackers

logger = logging.getLogger(__name__)


def is_evaluation(row: dict) -> bool:
    """A metrics.jsonl line of a held-out evaluation (eval/<name>), not of a training step."""
    return any(key.startswith("eval/") for key in row)


class RunLog:
    """Opened once the run's state is known (``resume_step``: the checkpoint's step, None for a fresh run),
    before anything is evaluated. Every process opens it; a tracker that fails to open (a key W&B refuses, a
    Space that does not deploy) stops every process with one line, before training."""

    def __init__(self, run, resume_step: int | None, completions: bool = True):
        cfg, out, main = run.cfg, run.output_dir, run.accelerator.is_main_process
        self.cfg, self.main = cfg, main
        max_steps = cfg.sizes.max_steps
        # Kept on resume: the lines up to the checkpoint's step, but not the final evaluation's when resuming
        # at the last step (the final evaluation comes after that checkpoint and is done again).
        keep = None if resume_step is None else (
            lambda row: row.get("step", 0) <= resume_step and not (
                resume_step == max_steps and row.get("step") == max_steps and is_evaluation(row)))
        self.metrics = MetricsWriter(out / "metrics.jsonl", enabled=main, keep=keep)
        self.completions = MetricsWriter(out / "completions.jsonl", enabled=main and completions, keep=keep,
                                         remember=False)
        self.history = [m for m in self.metrics.kept if not is_evaluation(m)]  # training steps only
        self.trackers, self.publisher, failure = None, None, None
        if main:
            try:
                self.trackers = Trackers(run.trackers, cfg, out, resume_step)
            except Exception as err:  # noqa: BLE001 - raised below, on every process
                failure = TrackerError(f"report_to: opening a tracker failed ({type(err).__name__}: "
                                       f"{' '.join(str(err).split())[:300]})")
        try:
            raise_on_every_process(run.accelerator, failure, lambda: TrackerError(
                "report_to: opening a tracker failed on process 0 (its message is there)"))
        except TrackerError:
            self.close(failed=True)
            raise
        if main and run.hub_repo is not None:
            from rloo.publish import Publisher

            self.publisher = Publisher(cfg, run.hub_repo)

    def is_logged(self, step: int) -> bool:
        return step % self.cfg.logging_steps == 0 or step == self.cfg.sizes.max_steps

    def step(self, metrics: dict, rows: list[dict] | None) -> None:
        """One optimizer step: its metrics (written on logged steps), and its batch's completions when given."""
        self.history.append(metrics)
        if not self.main or not self.is_logged(metrics["step"]):
            return
        self.metrics.write(metrics)
        self.trackers.log(metrics)
        if rows:
            self.completions.write_many(rows)
            if self.cfg.log_completions:
                print_completions(rows, self.cfg.num_completions_to_print, metrics["step"])
                self.trackers.log_table([table_row(row) for row in rows], metrics["step"])

    def wants_completions(self, step: int, batch_step: int) -> bool:
        """Whether this step writes its generation batch's completions (sampled at ``batch_step``): at the
        batch's first logged step, so each batch once, and a resume inside a reused batch agrees. The same
        on every process (they gather the rows together)."""
        return self.is_logged(step) and not any(self.is_logged(s) for s in range(batch_step, step))

    def evaluation(self, line: dict) -> None:
        if self.main:
            self.metrics.write(line)
            self.trackers.log(line)

    def checkpoint_saved(self, path: Path | None, step: int) -> None:
        if self.publisher is not None and path is not None:
            self.publisher.push_checkpoint(path, step)

    @property
    def tracker_links(self) -> dict[str, str]:
        return dict(self.trackers.links) if self.trackers is not None else {}

    def close(self, failed: bool = False) -> None:
        """Idempotent; ``failed``: the run stopped on an error."""
        self.metrics.close()
        self.completions.close()
        if self.trackers is not None:
            self.trackers.finish(failed=failed)


def completion_rows(run, rollout: Rollout, samples: dict[str, torch.Tensor], step: int) -> list[dict]:
    """The generation batch's completions, one row each, from every process in rank order (``samples``: the
    gathered per-completion tensors of update.across_processes). Called on every process; rows on process 0."""
    k = rollout.num_generations
    local = [{"prompt": (rollout.raw_prompts or rollout.prompts)[i // k], "completion": text}
             for i, text in enumerate(rollout.completions)]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        local = gather_object(local)
    rewards_BF, scores_B = samples["rewards_BF"].cpu(), samples["scores_B"].cpu()
    advantages_B, lengths_B, truncated_B = (samples[name].cpu() for name in ("advantages_B", "lengths_B", "truncated_B"))
    names = run.sources.names
    return [{"step": step, **row,
             "rewards": {name: _finite(rewards_BF[i, f]) for f, name in enumerate(names)},
             "reward": _finite(scores_B[i]), "advantage": _finite(advantages_B[i]),
             "length": int(lengths_B[i]), "truncated": bool(truncated_B[i])}
            for i, row in enumerate(local)]


def _finite(value: torch.Tensor) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def table_row(row: dict) -> dict:
    """A completions.jsonl row as a flat table row (trackers' tables)."""
    flat = {"step": row["step"], "prompt": prompt_text(row["prompt"]), "completion": row["completion"]}
    flat.update({name: value for name, value in row["rewards"].items()})
    flat.update(reward=row["reward"], advantage=row["advantage"], length=row["length"], truncated=row["truncated"])
    return flat


def print_completions(rows: list[dict], limit: int | None, step: int) -> None:
    """TRL's console table (rich): prompt, completion, each reward source, advantage; ``limit`` rows."""
    from rich.console import Console
    from rich.table import Table

    shown = rows if limit is None else rows[:limit]
    if not shown:
        return
    table = Table(title=f"step {step}: {len(shown)} of {len(rows)} completions", show_lines=True, expand=True)
    names = list(shown[0]["rewards"])
    for column in ["prompt", "completion", *names, "advantage"]:
        table.add_column(column, overflow="fold", ratio=3 if column in ("prompt", "completion") else 1)
    fmt = lambda value: "n/a" if value is None else f"{value:.3f}"  # noqa: E731
    for row in shown:
        text = prompt_text(row["prompt"])
        table.add_row(text[-300:], row["completion"], *(fmt(row["rewards"][n]) for n in names), fmt(row["advantage"]))
    Console().print(table)

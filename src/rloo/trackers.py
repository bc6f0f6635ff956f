"""Trackers (``report_to``, transformers' names): TensorBoard, Weights & Biases and Trackio.

Each is an optional extra, imported only when asked for. ``check_trackers`` runs at setup, before any model
loads, so a missing package or a tracker that cannot log (online wandb without a key or a network, a Trackio
Space with the Hub offline) is one line at start, not a traceback an hour in. Only the main process logs.
Every metrics.jsonl line goes to every tracker with its step as x: training metrics as ``train/<name>`` and
evaluation as ``eval/<name>``, as transformers' callbacks name them, so a TRL user's dashboards read the same.
A tracker that fails mid-run is warned about once and dropped: metrics.jsonl still holds everything.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from rloo.schema import scrubbed_argv

logger = logging.getLogger(__name__)

KNOWN = ("tensorboard", "wandb", "trackio")  # each an extra of its own name: pip install 'rloo[wandb]'
STATE_FILE = "trackers.json"  # in the run folder: the wandb run id, so that a resume continues the same run


def resolve_report_to(report_to: list[str]) -> list[str]:
    """``none`` -> [], ``all`` -> every installed tracker, else the names (checked), in order, once each."""
    names = [part.strip().lower() for name in report_to for part in str(name).split(",") if part.strip()]
    if not names or names == ["none"]:
        return []
    if "all" in names:
        return [name for name in KNOWN if importlib.util.find_spec(name) is not None]
    for name in names:
        if name not in KNOWN:
            raise ValueError(f"report_to: unknown tracker {name!r}; rloo logs to {', '.join(KNOWN)} (or all / none)")
    return list(dict.fromkeys(names))


def check_trackers(cfg) -> list[str]:
    """The trackers of ``cfg.report_to``, each shown usable now; else ValueError, one line naming it."""
    names = resolve_report_to(cfg.report_to)
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"report_to {name}: the {name} package is not installed; pip install 'rloo[{name}]' "
                             "or drop it from report_to (metrics.jsonl holds every metric)")
    if "wandb" in names:
        _check_wandb()
    if "trackio" in names:
        _check_trackio(cfg)
    return names


def _check_wandb() -> None:
    mode = os.environ.get("WANDB_MODE", "online").lower()
    if mode in ("offline", "dryrun", "disabled") or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not os.environ.get("WANDB_API_KEY") and not _netrc_key(base):
        raise ValueError(f"report_to wandb: no W&B API key for {base} (WANDB_API_KEY or `wandb login`); log without "
                         "one with WANDB_MODE=offline (then `wandb sync <run folder>/wandb/offline-run-*`)")
    import httpx

    try:
        httpx.get(base, timeout=10.0)
    except httpx.HTTPError as err:
        raise ValueError(f"report_to wandb: cannot reach {base} ({type(err).__name__}); log locally with "
                         "WANDB_MODE=offline and `wandb sync` later, or drop wandb from report_to") from None


def _netrc_key(base_url: str) -> str | None:
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(base_url).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def _check_trackio(cfg) -> None:
    space = cfg.trackio_space_id or os.environ.get("TRACKIO_SPACE_ID")
    if not space:
        return  # a local project (TRACKIO_DIR, default ~/.cache/huggingface/trackio): nothing to reach
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"report_to trackio: trackio_space_id {space!r} needs the Hugging Face Hub, and HF_HUB_OFFLINE "
                         "is set; drop trackio_space_id to log to a local Trackio project")
    if get_token() is None:
        raise ValueError(f"report_to trackio: trackio_space_id {space!r} needs a Hugging Face token (`hf auth login` "
                         "or HF_TOKEN); drop trackio_space_id to log to a local Trackio project")


def tracker_key(name: str) -> str:
    """metrics.jsonl's name -> the trackers' (``reward`` -> ``train/reward``; ``eval/...`` stays)."""
    return name if name.startswith("eval/") else f"train/{name}"


def scalars(metrics: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl line, under the trackers' names (None, text and the step dropped)."""
    return {tracker_key(k): float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}


class Trackers:
    """The run's open trackers (main process only; an empty list elsewhere)."""

    def __init__(self, names: list[str], cfg, output_dir: Path, resume_step: int | None = None):
        self.names, self.output_dir = [], Path(output_dir)
        self.links: dict[str, str] = {}  # tracker -> its run's page, for the model card
        self._handles: dict[str, object] = {}
        state = _read_state(self.output_dir) if resume_step is not None else {}
        run_name = cfg.run_name or self.output_dir.resolve().name
        config = cfg.to_dict()  # without the Hub token
        argv = sys.argv
        sys.argv = scrubbed_argv(argv)  # wandb records the command line: not a --hub_token on it
        try:
            for name in names:
                opener = getattr(self, f"_open_{name}")
                self._handles[name] = opener(cfg, run_name, config, state, resume_step)
                self.names.append(name)
        except Exception:
            self.finish(failed=True)
            raise
        finally:
            sys.argv = argv
        if "wandb" in self._handles:
            state["wandb"] = {"id": self._handles["wandb"].id, "url": self.links.get("Weights & Biases")}
            (self.output_dir / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")

    def _open_tensorboard(self, cfg, run_name, config, state, resume_step):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events its killed predecessor logged after the checkpoint.
        writer = SummaryWriter(log_dir=str(self.output_dir / "runs"),
                               purge_step=resume_step + 1 if resume_step is not None else None)
        writer.add_text("config", "\n".join(f"    {k}: {v!r}" for k, v in config.items()), 0)
        return writer

    def _open_wandb(self, cfg, run_name, config, state, resume_step):
        import wandb

        previous = state.get("wandb", {}).get("id")
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", cfg.project), name=run_name, config=config,
                         dir=str(self.output_dir), id=previous, resume="allow" if previous else None)
        run.define_metric("train/*", step_metric="train/global_step")
        run.define_metric("eval/*", step_metric="train/global_step")
        if run.url:  # None offline
            self.links["Weights & Biases"] = run.url
        return run

    def _open_trackio(self, cfg, run_name, config, state, resume_step):
        import trackio

        space = cfg.trackio_space_id or os.environ.get("TRACKIO_SPACE_ID")
        if space:  # its dashboard (a bare name is in the user's namespace: trackio resolves it; the card links it)
            from huggingface_hub import constants

            self.links["Trackio"] = f"{constants.ENDPOINT}/spaces/{space}"
        # a resume continues the run of its name; a fresh run with a used name is a new run (trackio's "never")
        return trackio.init(project=cfg.project, name=run_name, config=config,
                            resume="allow" if resume_step is not None else "never",
                            space_id=cfg.trackio_space_id or None, private=cfg.hub_private_repo, embed=False)

    def log(self, metrics: dict) -> None:
        """One metrics.jsonl line (training or evaluation) at its step."""
        step, values = int(metrics["step"]), scalars(metrics)
        for name in list(self._handles):
            self._call(name, f"_log_{name}", values, step)

    def _log_tensorboard(self, writer, values, step):
        for key, value in values.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    def _log_wandb(self, run, values, step):
        run.log({**values, "train/global_step": step}, step=step)

    def _log_trackio(self, run, values, step):
        run.log(values, step=step)

    def log_table(self, rows: list[dict], step: int) -> None:
        """The completions table of one step: a wandb Table, a trackio Table, TensorBoard text."""
        if rows:
            for name in list(self._handles):
                self._call(name, f"_table_{name}", rows, step)

    def _table_tensorboard(self, writer, rows, step):
        columns = list(rows[0])
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
        writer.add_text("completions", "\n".join(lines), step)
        writer.flush()

    def _table_wandb(self, run, rows, step):
        import wandb

        columns = list(rows[0])
        run.log({"completions": wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows]),
                 "train/global_step": step}, step=step)

    def _table_trackio(self, run, rows, step):
        import pandas as pd
        import trackio

        run.log({"completions": trackio.Table(dataframe=pd.DataFrame(rows))}, step=step)

    def _call(self, name: str, method: str, *args) -> None:
        try:
            getattr(self, method)(self._handles[name], *args)
        except Exception as err:  # noqa: BLE001 - a tracker never stops training; metrics.jsonl has it all
            logger.warning("report_to %s: logging failed (%s: %s); %s is dropped for the rest of the run, "
                           "metrics.jsonl keeps every metric", name, type(err).__name__, err, name)
            self._handles.pop(name, None)

    def finish(self, failed: bool = False) -> None:
        """Close every tracker; ``failed``: the run stopped on an error (wandb marks its run failed)."""
        for name, handle in list(self._handles.items()):
            try:
                if name == "trackio":
                    import trackio

                    trackio.finish()  # also forgets the current run, so a next run in this process starts fresh
                elif name == "wandb":
                    handle.finish(exit_code=1 if failed else 0)
                else:
                    handle.close()
            except Exception as err:  # noqa: BLE001
                logger.warning("report_to %s: closing failed (%s: %s)", name, type(err).__name__, err)
        self._handles.clear()


def _cell(value) -> str:
    """One markdown table cell: text on one line, pipes escaped."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", "<br>")


def _read_state(output_dir: Path) -> dict:
    try:
        return json.loads((output_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}

"""The Hugging Face Hub upload (``push_to_hub``, ``hub_model_id``, ``hub_private_repo``, ``hub_strategy``:
transformers' names), with huggingface_hub.

``check_hub`` runs at setup, before anything is loaded: without a token or a reachable Hub the run stops
there in one line, never after an hour of training. ``every_save`` uploads each checkpoint to
``last-checkpoint/`` in the background as it is committed (one at a time: a save while the previous upload
still runs is skipped, as transformers does unless ``hub_always_push``); the end uploads the run folder.
"""

from __future__ import annotations

import concurrent.futures
import logging
from pathlib import Path

from rloo.errors import RlooError

logger = logging.getLogger(__name__)

# Never uploaded: the folder's lock, the final write's staging folders, wandb's local files (synced by wandb itself).
IGNORED = [".rloo*", ".tmp-final/**", ".final-ready/**", "wandb/**", "*.tmp", "checkpoints/**", "**/.rloo*"]


class HubPushError(RlooError):
    """The run finished and its folder is whole on disk, but the upload failed."""


def check_hub(cfg, output_dir: Path) -> str | None:
    """The repository id the run will push to (None without push_to_hub), after checking that the Hub is
    reachable and the token is valid; else ValueError in one line."""
    if not cfg.push_to_hub:
        return None
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise ValueError("push_to_hub: the Hugging Face Hub is off (HF_HUB_OFFLINE is set); unset it, or train with "
                         "push_to_hub false and upload the run folder later with `hf upload`")
    token = cfg.hub_token or get_token()
    if token is None:
        raise ValueError("push_to_hub: no Hugging Face token; log in with `hf auth login`, set HF_TOKEN, or pass "
                         "--hub_token")
    try:
        user = HfApi(token=token).whoami()["name"]
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        why = "the token is not valid" if status == 401 else f"the Hub answered {status}"
        raise ValueError(f"push_to_hub: {why} ({constants.ENDPOINT}); log in again with `hf auth login`") from None
    except Exception as err:  # noqa: BLE001 - httpx / OS errors: no network, DNS, proxy
        raise ValueError(f"push_to_hub: cannot reach the Hugging Face Hub at {constants.ENDPOINT} "
                         f"({type(err).__name__}); train with push_to_hub false and upload later with `hf upload`") from None
    return repo_id(cfg.hub_model_id, output_dir, user)


def repo_id(hub_model_id: str | None, output_dir: Path, user: str) -> str:
    """transformers' rule: hub_model_id, in the user's namespace when it has none; default the output_dir's name."""
    name = hub_model_id or Path(output_dir).resolve().name
    return name if "/" in name else f"{user}/{name}"


class Publisher:
    """Uploads for one run: checkpoints in the background (every_save), the run folder at the end."""

    def __init__(self, cfg, repo: str):
        from huggingface_hub import HfApi

        self.repo, self.strategy, self.revision = repo, cfg.hub_strategy, cfg.hub_revision
        self.api = HfApi(token=cfg.hub_token or None)
        self.api.create_repo(repo, private=cfg.hub_private_repo, exist_ok=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rloo-hub")
        self._pending: concurrent.futures.Future | None = None

    def push_checkpoint(self, checkpoint: Path, step: int) -> None:
        """every_save: a committed checkpoint to last-checkpoint/, without waiting for it."""
        if self.strategy != "every_save":
            return
        if self._pending is not None and not self._pending.done():
            logger.info("push_to_hub: the previous checkpoint is still uploading; step %d's is skipped", step)
            return
        self._pending = self._pool.submit(self.api.upload_folder, repo_id=self.repo, folder_path=str(checkpoint),
                                          path_in_repo="last-checkpoint", revision=self.revision,
                                          commit_message=f"rloo: checkpoint at step {step}",
                                          delete_patterns=["*"], ignore_patterns=IGNORED[:-2])
        self._pending.add_done_callback(lambda future: _warn_if_failed(future, step))

    def push_folder(self, output_dir: Path) -> str:
        """The run folder (model, card, report, metrics, completions, tensorboard runs/), after the last
        checkpoint upload; returns the repository's URL."""
        self.wait()
        try:
            self.api.upload_folder(repo_id=self.repo, folder_path=str(output_dir), revision=self.revision,
                                   commit_message="rloo: the trained model and its run", ignore_patterns=IGNORED)
        except Exception as err:  # noqa: BLE001 - any transport or Hub error: the folder on disk is whole
            raise HubPushError(f"push_to_hub: uploading {output_dir} to {self.repo} failed ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:200]}); the run folder is complete on disk: upload it "
                               f"with `hf upload {self.repo} {output_dir}`") from None
        from huggingface_hub import constants

        return f"{constants.ENDPOINT}/{self.repo}"

    def wait(self) -> None:
        if self._pending is not None:
            concurrent.futures.wait([self._pending])
        self._pool.shutdown(wait=True)


def _warn_if_failed(future: concurrent.futures.Future, step: int) -> None:
    if future.exception() is not None:
        err = future.exception()
        logger.warning("push_to_hub: uploading the checkpoint of step %d failed (%s: %s); training goes on, the "
                       "run folder is uploaded at the end", step, type(err).__name__, " ".join(str(err).split()))

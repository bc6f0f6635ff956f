"""The Hugging Face Hub upload (``push_to_hub``, ``hub_model_id``, ``hub_private_repo``, ``hub_strategy``:
transformers' names), with huggingface_hub.

``check_hub`` runs at setup, before anything is loaded: without a token or a reachable Hub the run stops
there in one line, never after an hour of training. ``every_save`` uploads each committed checkpoint in the
background to ``checkpoints/step-N/`` (with the reference policy, ``checkpoints/reference/``, so that a
download resumes), the previous one removed from the repository; one upload at a time: a save while the
previous upload still runs is skipped, as transformers does unless ``hub_always_push``. The end uploads the
run folder, after every process is done.
"""

from __future__ import annotations

import concurrent.futures
import logging
from pathlib import Path

from rloo.errors import RlooError

logger = logging.getLogger(__name__)

# Never uploaded with the run folder: its lock and listing, the final write's staging folders, wandb's local files
# (wandb syncs them itself), half-written files, and the checkpoints (every_save sends the newest on its own).
FOLDER_IGNORED = [".rloo*", ".tmp-final/**", ".final-ready/**", "wandb/**", "*.tmp", "checkpoints/**"]


class HubPushError(RlooError):
    """The run finished and its folder is whole on disk, but the upload failed."""


def check_hub(cfg, output_dir: Path) -> str | None:
    """The repository the run will push to (None without push_to_hub), created now (or found) with the
    run's token, so that an unreachable Hub, a bad token or a namespace it cannot write to stop the run
    before anything loads; ValueError in one line."""
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
    api, repo = HfApi(token=token), None
    try:
        me = api.whoami()
        role = me.get("auth", {}).get("accessToken", {}).get("role")
        if role == "read":
            raise ValueError("push_to_hub: the token is read-only; make one with write access (`hf auth login`)")
        repo = repo_id(cfg.hub_model_id, output_dir, me["name"])
        api.create_repo(repo, private=cfg.hub_private_repo, exist_ok=True)
        if cfg.hub_revision:
            api.create_branch(repo, branch=cfg.hub_revision, exist_ok=True)
    except ValueError:
        raise
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status == 401 and repo is None:
            raise ValueError(f"push_to_hub: the token is not valid ({constants.ENDPOINT}); log in again with "
                             "`hf auth login`") from None
        raise ValueError(f"push_to_hub: the Hub refused {'the token' if repo is None else f'to create {repo}'} "
                         f"({status}: {' '.join(str(err).split())[:160]}); check hub_model_id and the token's "
                         "write access") from None
    except Exception as err:  # noqa: BLE001 - httpx / OS errors: no network, DNS, proxy
        raise ValueError(f"push_to_hub: cannot reach the Hugging Face Hub at {constants.ENDPOINT} "
                         f"({type(err).__name__}); train with push_to_hub false and upload later with `hf upload`") from None
    return repo


def repo_id(hub_model_id: str | None, output_dir: Path, user: str) -> str:
    """transformers' rule: hub_model_id, in the user's namespace when it has none; default the output_dir's name."""
    name = hub_model_id or Path(output_dir).resolve().name
    return name if "/" in name else f"{user}/{name}"


class Publisher:
    """Uploads for one run (main process): checkpoints in the background (every_save), the run folder at the end."""

    def __init__(self, cfg, repo: str):
        from huggingface_hub import HfApi

        self.repo, self.strategy, self.revision = repo, cfg.hub_strategy, cfg.hub_revision
        self.api = HfApi(token=cfg.hub_token or None)  # the repository exists: check_hub made it
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rloo-hub")
        self._pending: concurrent.futures.Future | None = None

    def push_checkpoint(self, checkpoint: Path, step: int) -> None:
        """every_save: a committed checkpoint (and the reference policy beside it) to checkpoints/, the
        repository's earlier one removed, without waiting for the upload."""
        if self.strategy != "every_save":
            return
        if self._pending is not None and not self._pending.done():
            logger.info("push_to_hub: the previous checkpoint is still uploading; step %d's is skipped", step)
            return
        self._pending = self._pool.submit(self.api.upload_folder, repo_id=self.repo,
                                          folder_path=str(checkpoint.parent), path_in_repo="checkpoints",
                                          allow_patterns=[f"{checkpoint.name}/**", "reference/**"],
                                          delete_patterns=["step-*/**"], revision=self.revision,
                                          commit_message=f"rloo: checkpoint at step {step}")
        self._pending.add_done_callback(lambda future: _warn_if_failed(future, step))

    def push_folder(self, output_dir: Path) -> str:
        """The run folder (model, card, report, metrics, completions, tensorboard runs/), after the last
        checkpoint upload; returns the repository's URL."""
        self.wait()
        try:
            self.api.upload_folder(repo_id=self.repo, folder_path=str(output_dir), revision=self.revision,
                                   commit_message="rloo: the trained model and its run", ignore_patterns=FOLDER_IGNORED)
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

"""The final model folder, written whole or not at all.

The run folder is itself the model folder (``from_pretrained(output_dir)``, as after TRL's
``save_model``), so its model files cannot be swapped by renaming one folder. They are installed in
three moves, each of which survives being killed:

1. ``write`` fills ``<out>/.tmp-final/``; every file and the folder are fsynced. A failure (a full
   disk, a read-only folder, an exception) removes it: the earlier model files are untouched and the
   error names the checkpoint that holds the trained weights.
2. ``.tmp-final`` is renamed to ``.final-ready`` (atomic): from here the new set is whole and wins.
3. ``install`` moves each file of ``.final-ready`` over its namesake (``os.replace``), removes the files
   of the earlier set it does not have (``.rloo-final.json`` lists the installed set), writes the new
   list, and removes ``.final-ready``. Killed in the middle, it is finished by the next rloo command that
   opens the folder (``recover``: ``rloo train`` on it, ``rloo eval``, ``rloo generate``,
   ``rloo vllm-serve``): it only moves files and repeats nothing already done.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from rloo.errors import FinalWriteError
from rloo.files import fsync as _fsync

TMP, READY, INSTALLED, LISTING = ".tmp-final", ".final-ready", ".rloo-final.json", ".files.json"



def write_final(out: Path, write: Callable[[Path], None], checkpoint: Path | None = None) -> None:
    """Steps 1-3 above; ``write(folder)`` writes the model files into ``folder``."""
    recover(out)  # a set a killed run left ready goes in first (it is older than this one)
    tmp = out / TMP
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / LISTING).write_text(json.dumps({"files": files}), encoding="utf-8")
        for name in [*files, LISTING]:
            _fsync(tmp / name)
        _fsync(tmp)
    except (OSError, SafetensorError, TypeError, ValueError) as err:  # safetensors reports a full disk as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = " ".join(str(getattr(err, "strerror", None) or err).split())
        kept = (f"the trained weights are in checkpoint {checkpoint}; write the folder again with `rloo train "
                f"--resume_from_checkpoint {checkpoint}`" if checkpoint is not None else
                "no checkpoint holds the trained weights")
        raise FinalWriteError(f"could not write the final model to {out}: {reason} ({type(err).__name__}); the "
                              f"earlier model files there are untouched; {kept}") from err
    os.replace(tmp, out / READY)
    _fsync(out)
    install(out)


def install(out: Path) -> None:
    """Step 3, idempotent: a second call finishes what a killed first one began."""
    ready = out / READY
    new = _listed(ready / LISTING)
    for name in new:
        source, target = ready / name, out / name
        if source.exists():  # not yet moved by an earlier, interrupted install
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    for name in sorted(set(_earlier_set(out)) - set(new)):  # the earlier set's files the new one lacks
        (out / name).unlink(missing_ok=True)
    os.replace(ready / LISTING, out / INSTALLED)  # the new set is the installed one
    shutil.rmtree(ready, ignore_errors=True)
    _fsync(out)


# A run folder written before the listing existed: its model files are these (save_pretrained's,
# the tokenizer's, rloo's own).
_RUN_FOLDER_FILES = ("model*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                     "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                     "chat_template.*", "config.yaml", "eval.json", "README.md")


def _earlier_set(out: Path) -> list[str]:
    if (out / INSTALLED).is_file():
        return _listed(out / INSTALLED)
    if not (out / "config.yaml").is_file():  # not an rloo run folder's final set: leave every file alone
        return []
    return sorted({p.name for pattern in _RUN_FOLDER_FILES for p in out.glob(pattern) if p.is_file()})


def _listed(path: Path) -> list[str]:
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def recover(out: Path) -> None:
    """Finish an install a killed process left (``.final-ready`` present), drop a set it never made ready
    (``.tmp-final``). Only by the folder's lock holder: a live run's write is its own."""
    out = Path(out)
    shutil.rmtree(out / TMP, ignore_errors=True)  # a killed step 1: never ready, so never used
    if (out / READY).is_dir():
        if not (out / READY / LISTING).is_file():  # killed after its listing moved: only the folder is left
            shutil.rmtree(out / READY, ignore_errors=True)
            return
        install(out)

"""The run folder a run owns: a lock held for the run's life, a fresh run refused in a folder that holds
anything, and ``overwrite_output_dir`` moving an earlier run aside whole instead of mixing with it.

The lock is ``<output_dir>/.rloo.lock``, an ``flock`` on an open file that holds the owner's pid, host
and start time: the kernel releases it when the process ends however it ends, so a second run into
the folder is refused while the first lives, and a lock file left by a killed run is found free. Its
content then says a run did not end cleanly (killed, out of memory, a crash): reported in one warning
naming that pid, and the new run (typically its resume) takes the folder over.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

from rloo.errors import RunFolderError
from rloo.final import READY, recover
from rloo.schema import scrubbed_argv

logger = logging.getLogger(__name__)

LOCK = ".rloo.lock"
_held: set[int] = set()  # lock descriptors of this process: a forked child closes its copies


def _close_in_child() -> None:
    """A forked child (a reward function's multiprocessing pool, a DataLoader worker) shares the lock's open
    file: were the parent killed, the child would keep the folder locked. Its copy is closed at once
    (closing one copy does not release a lock the parent still holds)."""
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class FolderLock:
    """An exclusive flock on ``<folder>/.rloo.lock``; ``release`` removes the file, then unlocks."""

    def __init__(self, folder: Path, fd: int, stale: dict | None, created: bool):
        self.folder, self.fd, self.stale, self.created = folder, fd, stale, created

    def release(self) -> None:
        """Tidy up while still holding the lock (nobody else can be in the folder), then unlock."""
        if self.fd is None:
            return
        _held.discard(self.fd)
        try:
            metrics = self.folder / "metrics.jsonl"
            if metrics.is_file() and metrics.stat().st_size == 0:
                metrics.unlink()  # a run that failed before its first step's line: nothing to keep or to refuse
            (self.folder / LOCK).unlink(missing_ok=True)  # while held: nobody locks a file about to vanish
            if self.created and self.folder.is_dir() and not any(self.folder.iterdir()):
                self.folder.rmdir()  # a run that failed before writing anything leaves no empty folder
        except OSError:
            pass  # tidying only: the lock itself ends below whatever happens
        finally:
            os.close(self.fd)
            self.fd = None


def describe(holder: dict | None) -> str:
    if not holder:
        return "owner unknown"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def _read(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        value = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": "?", "host": "?", "started": "?", "command": "unreadable lock file"}
    return value if isinstance(value, dict) else None


def lock_folder(folder: Path, created: bool = False) -> FolderLock:
    """Hold ``folder``'s lock, or raise RunFolderError naming the run that holds it."""
    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunFolderError(f"output_dir '{folder}' is in use by another run ({describe(holder)}); wait for it "
                                 "to end or choose another output_dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by its releasing owner between our open and our lock: again
    stale = _read(fd)
    if stale:
        logger.warning("output_dir '%s': the run that held it did not end cleanly (%s; killed or crashed): this "
                       "run takes the folder over", folder, describe(stale))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds"),
          "command": " ".join(scrubbed_argv(sys.argv))[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode("utf-8"))
    os.fsync(fd)
    _held.add(fd)
    return FolderLock(folder, fd, stale, created)


def claim(folder: Path, *, fresh: bool, overwrite: bool) -> FolderLock:
    """Create (if needed) and lock the run folder. A fresh run (not continuing this folder's checkpoints)
    refuses a folder that holds anything besides a lock file, unless ``overwrite``: the folder is then
    renamed aside whole (``<name>.replaced-<time>``) and the run starts in a new empty one."""
    created = not folder.exists()
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"output_dir '{folder}' is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(folder, created)
    try:
        recover(folder)  # a final model install a killed run left half done is finished first
        held = sorted(p.name for p in folder.iterdir() if p.name != LOCK)
        if not fresh or not held:
            return lock
        what = "a run" if {"config.yaml", "metrics.jsonl", "checkpoints"} & set(held) else "files"
        if not overwrite:
            listed = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            resume = " continue it with --resume_from_checkpoint latest," if "checkpoints" in held else ""
            raise RunFolderError(f"output_dir '{folder}' already holds {what} ({listed}):{resume} choose another "
                                 "output_dir, or set overwrite_output_dir true to move it aside and start again")
        aside = _aside_name(folder)
        os.rename(folder, aside)  # one atomic move: the earlier run stays whole, next to the new one
        logger.warning("overwrite_output_dir: the earlier contents of '%s' were moved to '%s'", folder, aside)
    except BaseException:
        lock.release()
        raise
    lock.release()  # the lock file moved with the folder; its flock ends here
    (aside / LOCK).unlink(missing_ok=True)
    folder.mkdir(parents=True)
    return lock_folder(folder, created=True)


def _aside_name(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = folder.with_name(f"{folder.name}.replaced-{stamp}"), 1
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}.replaced-{stamp}-{n}")
    return candidate


def recover_if_free(folder: Path) -> None:
    """For commands that read a run folder (eval, generate, vllm-serve): finish a final model install a
    killed run left half done, unless a live run holds the folder (it finishes its own)."""
    if not (folder / READY).is_dir():
        return
    try:
        lock = lock_folder(folder)
    except RunFolderError:
        return
    try:
        recover(folder)
    finally:
        lock.release()

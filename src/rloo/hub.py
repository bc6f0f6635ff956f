"""Loading from the Hugging Face Hub or a local folder, with one-line errors.

Every ``from_pretrained`` / ``load_dataset`` that may reach the Hub goes through here, so a
machine without the Hub (offline, firewalled) gets one clear line instead of a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from safetensors import SafetensorError

T = TypeVar("T")

_UNREACHABLE_HINTS = (
    "offline",
    "couldn't connect",
    "could not connect",
    "connection",
    "resolve",
    "max retries",
    "timed out",
    "name or service not known",
    "temporary failure",
    "not a local folder",
    "cannot find the requested files",
    "local_files_only",
    "couldn't reach",
)


class HubUnreachableError(OSError):
    """A model or dataset id is not a local path and the Hugging Face Hub cannot be reached."""


def is_local(name_or_path: str) -> bool:
    return os.path.exists(os.path.expanduser(name_or_path))


def _looks_unreachable(err: BaseException) -> bool:
    text = " ".join(str(e) for e in (err, err.__cause__, err.__context__) if e).lower()
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return offline or any(hint in text for hint in _UNREACHABLE_HINTS)


def call_hub(what: str, name_or_path: str, load: Callable[[], T]) -> T:
    """Run ``load()``; if ``name_or_path`` is a hub id and the Hub is unreachable, raise one line.

    ``what`` names the thing for the message, e.g. ``"policy model"`` or ``"dataset"``.
    """
    try:
        return load()
    except HubUnreachableError:
        raise
    except Exception as err:  # transformers/datasets raise OSError, ValueError, ConnectionError...
        if not is_local(name_or_path) and _looks_unreachable(err):
            raise HubUnreachableError(
                f"cannot load {what} '{name_or_path}': it is not a local path and the Hugging Face Hub "
                "is unreachable (offline or no network); download it on a machine with the Hub, or pass a local folder"
            ) from None
        raise


def from_pretrained(cls: Any, name_or_path: str, what: str = "model", **kwargs: Any) -> Any:
    """``cls.from_pretrained(name_or_path, **kwargs)`` with the one-line hub error."""
    try:
        return call_hub(what, name_or_path, lambda: cls.from_pretrained(name_or_path, **kwargs))
    except SafetensorError as err:
        bad = _first_unreadable(Path(name_or_path)) if Path(name_or_path).is_dir() else None
        where = f"{bad}" if bad else f"a weights file of '{name_or_path}'"
        raise ValueError(f"{what}: {where} is not a readable safetensors file ({' '.join(str(err).split())}): "
                         "damaged or truncated? copy or save it again") from None


def _first_unreadable(folder: Path) -> Path | None:
    """The first .safetensors file of ``folder`` whose header or tensors do not read."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
            size = path.stat().st_size
            with open(path, "rb") as raw:
                header = int.from_bytes(raw.read(8), "little")
            if 8 + header > size:
                return path
        except (SafetensorError, OSError, ValueError):
            return path
    return None

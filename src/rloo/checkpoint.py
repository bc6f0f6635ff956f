"""Checkpoints that survive any interruption, and the state an exact resume needs.

Layout under ``<output_dir>/checkpoints/``::

    reference/              the reference policy as training started (beta > 0), written once
    step-000040/            one folder per save
        model.safetensors       policy weights (LoRA: adapter.safetensors, the trainable tensors only)
        optimizer.safetensors   optimizer tensors, "state.<param index>.<name>"
        rng.safetensors         torch CPU (and CUDA) generator states, per process ("rank<r>.")
        rollout-rank<r>.safetensors  process r's buffered generation batch, when the next step reuses it
        state.json              the rest: step, data position, scheduler, optimizer groups, and per
                                process python and numpy RNG, counters, rollout texts; eval_before,
                                the resolved config, the layout ("whole", or FSDP / DeepSpeed's)
        sharded/ or deepspeed/  in place of the model and optimizer files under FSDP2 / DeepSpeed: what
                                each process holds, written by every process (shards.py)
        COMMITTED               written last: {"step": N, "files": {name: {"size", "sha256"}}}

A save writes everything into ``.tmp-step-000040``, fsyncs each file, writes COMMITTED, renames the
folder and fsyncs the parent (torch.distributed.checkpoint's rule: metadata last). Discovery ignores
folders without COMMITTED (a half-written save is invisible); rotation removes old checkpoints only
after the new one is committed, COMMITTED first. Tensors are read with safetensors only: a file
holding a pickle raises instead of executing, and nothing rloo writes is a pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from rloo.adapters import has_adapters
from rloo.errors import CheckpointError
from rloo.files import fsync as _fsync
from rloo.train_state import TrainState, jsonable, split_optimizer, split_rollout, tagged, untag

logger = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
REFERENCE = "reference"
ADAPTER_FILE = "adapter.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------------------------ discovery
def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def committed_checkpoints(output_dir: str | Path) -> list[Path]:
    """Committed step folders, oldest first; folders without COMMITTED (half-written) are ignored."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / COMMIT_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume_path(spec: str, output_dir: str | Path) -> Path:
    """``latest`` -> the newest committed checkpoint of ``output_dir``; else the folder given, which
    must be committed."""
    if spec == "latest":
        found = committed_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from_checkpoint=latest: no committed checkpoint under {checkpoints_dir(output_dir)}")
        return found[-1]
    path = Path(spec)
    if not (path / COMMIT_MARKER).is_file():
        raise CheckpointError(f"resume_from_checkpoint: '{path}' is not a committed rloo checkpoint (no {COMMIT_MARKER})")
    return path


# ---------------------------------------------------------------------------------------------- write

def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"), object_hook=untag)  # older files' bare NaN also reads


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(tagged(value), allow_nan=False), encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _commit(tmp: Path, final: Path, step: int) -> None:
    """fsync every file (those in sub-folders too: a sharded save's), write COMMITTED (each file's size and
    sha256) last, rename into place, fsync the parent."""
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for name in names:
        _fsync(tmp / name)
    for folder in sorted({parent for name in names for parent in (tmp / name).parents if tmp in parent.parents}):
        _fsync(folder)  # every sub-folder (deepspeed/, deepspeed/state/), deepest last
    files = {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in names}
    _write_json(tmp / COMMIT_MARKER, {"step": step, "files": files})
    _fsync(tmp / COMMIT_MARKER)
    _fsync(tmp)
    if final.exists():  # uncommitted leftovers of this step (a committed one is never rewritten)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


def staging(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


def stage(final: Path) -> Path:
    """An empty staging folder for ``final`` (stale ones removed), for every process of a sharded save to
    write its part into before the main process commits it; one line on failure."""
    tmp = staging(final)
    try:
        _prepare(final.parent)
        tmp.mkdir()
    except OSError as err:
        _failed(final, err)
    return tmp


def _prepare(parent: Path) -> None:
    if not parent.is_dir():
        parent.mkdir(parents=True)
        _fsync(parent.parent)
    for stale in parent.glob(".tmp-*"):  # left by a save that was killed (one writer: the main process)
        shutil.rmtree(stale)


def _failed(final: Path, err: BaseException) -> None:
    """Remove the partial folder; raise one line that names what is still safe."""
    shutil.rmtree(staging(final), ignore_errors=True)
    previous = [p.name for p in committed_checkpoints(final.parent.parent)]
    kept = f"the newest committed checkpoint ({previous[-1]}) is intact" if previous else "no earlier checkpoint"
    reason = " ".join(str(getattr(err, "strerror", None) or err).split())
    raise CheckpointError(f"could not write checkpoint {final}: {reason} ({type(err).__name__}); {kept}") from err


def _atomic_folder(final: Path, step: int, write, staged: bool = False) -> Path:
    """Run ``write(tmp_folder)`` and commit; on any OSError remove the partial folder and raise one line.
    ``staged``: the staging folder already holds what the other processes wrote (``stage``)."""
    tmp = staging(final)
    if (final / COMMIT_MARKER).is_file():  # this step's state is already committed (a failure right after a save)
        return final
    try:
        if not staged:
            _prepare(final.parent)
            tmp.mkdir()
        write(tmp)
        _commit(tmp, final, step)
    except (OSError, SafetensorError, TypeError, ValueError) as err:  # safetensors reports a full disk as SafetensorError
        _failed(final, err)
    return final


def reference_saved(output_dir: str | Path) -> bool:
    return (checkpoints_dir(output_dir) / REFERENCE / COMMIT_MARKER).is_file()


def save_reference(output_dir: str | Path, reference: torch.nn.Module, tensors: dict | None = None) -> Path:
    """The reference policy, once per run (resume must not take it from a later policy); ``tensors``: its
    weights gathered from the shards (FSDP2 / ZeRO-3, shards.full_weights), else the model's own."""
    final = checkpoints_dir(output_dir) / REFERENCE
    if (final / COMMIT_MARKER).is_file():
        return final
    if tensors is not None:
        return _atomic_folder(final, 0, lambda tmp: save_file(tensors, str(tmp / "model.safetensors")))
    return _atomic_folder(final, 0, lambda tmp: save_model(reference, str(tmp / "model.safetensors")))


def step_folder(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step:06d}"


def save_checkpoint(output_dir: str | Path, policy: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                    scheduler, states: list[TrainState], config: dict, fingerprint: dict,
                    save_total_limit: int | None, sharded: dict | None = None) -> Path:
    """Write step ``states[0].step`` atomically, then drop the oldest beyond ``save_total_limit``.

    ``states``: one per process (rank order); they share step, data position, schedule and evaluation,
    and each keeps its own RNG, counters and buffered generation batch ("ranks" in state.json, tensors
    under "rank<r>." in rng.safetensors and in rollout-rank<r>.safetensors). ``sharded``: the processes
    already wrote weights and optimizer state into the staging folder (shards.save_sharded); its
    ``layout`` and the optimizer's JSON part go in state.json."""
    first = states[0]
    final = step_folder(output_dir, first.step)

    def write(tmp: Path) -> None:
        if sharded is not None:
            opt_json = sharded["optimizer"]
        else:
            if has_adapters(policy):  # LoRA: what trains; the base is the start model's, loaded again on resume
                save_file({name: p.detach().contiguous().cpu() for name, p in policy.named_parameters()
                           if p.requires_grad}, str(tmp / ADAPTER_FILE))
            else:
                save_model(policy, str(tmp / "model.safetensors"))
            opt_tensors, opt_json = split_optimizer(optimizer.state_dict())
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        ranks, rng_tensors = [], {}
        for rank, state in enumerate(states):
            rng_json, tensors = state.rng
            rng_tensors.update({f"rank{rank}.{name}": t.contiguous().cpu() for name, t in tensors.items()})
            rollout_json = None
            if state.rollout is not None:
                rollout_tensors, rollout_json = split_rollout(state.rollout)
                save_file(rollout_tensors, str(tmp / f"rollout-rank{rank}.safetensors"))
            ranks.append({"rng": rng_json, "counters": state.counters, "rollout": rollout_json})
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        _write_json(tmp / "state.json", {
            "step": first.step, "sampler": first.sampler, "num_processes": len(states),
            "scheduler": jsonable(first.scheduler or scheduler.state_dict()), "optimizer": opt_json,
            "eval_before": first.eval_before, "config": config, "fingerprint": fingerprint, "ranks": ranks,
            "scaler": first.scaler, "layout": sharded["layout"] if sharded is not None else "whole",
        })

    _atomic_folder(final, first.step, write, staged=sharded is not None)
    if save_total_limit:
        for old in committed_checkpoints(output_dir)[:-save_total_limit]:
            if old != final:
                remove_checkpoint(old)
    return final


def drop_newer_checkpoints(output_dir: str | Path, resumed: Path, step: int) -> None:
    """A run resumed from an earlier checkpoint of its own folder: the checkpoints past it are of the abandoned
    branch (``latest`` must not find them)."""
    if resumed.parent != checkpoints_dir(output_dir):
        return
    for newer in committed_checkpoints(output_dir):
        if int(newer.name.split("-")[1]) > step:
            logger.warning("removing %s: the run continues from the earlier %s", newer, resumed.name)
            remove_checkpoint(newer)


def remove_checkpoint(folder: Path) -> None:
    (folder / COMMIT_MARKER).unlink(missing_ok=True)  # invisible first, then removed
    shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- read
def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {path} is not a readable safetensors file ({err}); rloo reads "
                              "tensors with safetensors only and never unpickles") from None


def verify(path: Path, only: tuple[str, ...] | None = None, hashes: bool = True) -> None:
    """Every file COMMITTED names (or those in ``only``) has its committed size, then (``hashes``) its
    sha256; else one line, ``damaged: FILE``. (Checkpoints from before hashes carry sizes only.)"""
    try:
        files = _read_json(path / COMMIT_MARKER)["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: {COMMIT_MARKER} unreadable ({err})") from None
    expected = {name: entry if isinstance(entry, dict) else {"size": entry} for name, entry in files.items()
                if only is None or name in only}
    for name, entry in expected.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != entry.get("size"):
            raise CheckpointError(f"checkpoint {path}: damaged: {name} has {actual} bytes, {entry.get('size')} when "
                                  "committed")
    for name, entry in expected.items():
        if hashes and "sha256" in entry and _sha256(path / name) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: damaged: {name} (its sha256 differs from the one committed)")


# state.json's keys and the type each must have: a damaged or hand-edited file is named at its first bad key.
STATE_SCHEMA = {"step": int, "sampler": dict, "num_processes": int, "scheduler": dict, "optimizer": dict,
                "eval_before": (dict, type(None)), "config": dict, "fingerprint": dict, "ranks": list,
                "scaler": (dict, type(None))}
RANK_SCHEMA = {"rng": dict, "counters": dict, "rollout": (dict, type(None))}


def check_state(meta: Any, path: Path) -> None:
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: state.json: {key} {what}")

    if not isinstance(meta, dict):
        raise bad("(the whole file)", f"is a {type(meta).__name__}, expected an object")
    for key, kind in STATE_SCHEMA.items():
        if key not in meta:
            raise bad(f"'{key}'", "is missing")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise bad(f"'{key}'", f"is {type(meta[key]).__name__}, expected {getattr(kind, '__name__', 'object or null')}")
    if meta["step"] < 0 or meta["num_processes"] != len(meta["ranks"]):
        raise bad("'step' / 'num_processes'", f"out of range ({meta['step']}, {meta['num_processes']} for "
                  f"{len(meta['ranks'])} ranks)")
    for name in ("scalars", "param_groups"):
        if name not in meta["optimizer"]:
            raise bad(f"'optimizer.{name}'", "is missing")
    for rank, part in enumerate(meta["ranks"]):
        for key, kind in RANK_SCHEMA.items():
            if not isinstance(part, dict) or key not in part:
                raise bad(f"'ranks[{rank}].{key}'", "is missing")
            if not isinstance(part[key], kind):
                raise bad(f"'ranks[{rank}].{key}'", f"is {type(part[key]).__name__}")


def read_checkpoint(path: Path, hashes: bool = True) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """-> (state.json, {"optimizer", "rng", "rollout-rank<r>"...: tensors}) after ``verify``; weights are
    loaded by ``load_weights``."""
    verify(path, hashes=hashes)
    try:
        meta = _read_json(path / "state.json")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: state.json unreadable ({err})") from None
    check_state(meta, path)
    tensors = {name: load_tensors(path / f"{name}.safetensors") for name in ("optimizer", "rng")
               if meta.get("layout", "whole") == "whole" or name == "rng"}  # sharded: the processes' own files
    for rank, part in enumerate(meta["ranks"]):
        if part["rollout"] is not None:
            tensors[f"rollout-rank{rank}"] = load_tensors(path / f"rollout-rank{rank}.safetensors")
    return meta, tensors


def rank_state(meta: dict, tensors: dict, rank: int) -> tuple[dict, tuple[dict, dict[str, torch.Tensor]], Any]:
    """This process's (counters, RNG state, buffered batch parts or None) from a checkpoint."""
    part = meta["ranks"][rank]
    prefix = f"rank{rank}."
    rng = (part["rng"], {name[len(prefix):]: t for name, t in tensors["rng"].items() if name.startswith(prefix)})
    rollout = (part["rollout"], tensors[f"rollout-rank{rank}"]) if part["rollout"] is not None else None
    return part["counters"], rng, rollout


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    if (folder / ADAPTER_FILE).is_file():
        tensors, trainable = load_tensors(folder / ADAPTER_FILE), {n: p for n, p in model.named_parameters() if p.requires_grad}
        if tensors.keys() != trainable.keys():
            raise CheckpointError(f"checkpoint {folder}: its adapter does not fit the model's (missing "
                                  f"{sorted(trainable.keys() - tensors.keys())[:3]}, unexpected {sorted(tensors.keys() - trainable.keys())[:3]})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                trainable[name].copy_(tensor)
        return
    file = folder / "model.safetensors"
    load_tensors(file)  # a pickle or a damaged file fails here, with the one-line message
    missing, unexpected = load_model(model, str(file), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder}: weights do not fit the model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")


def read_config(path: Path) -> dict:
    """The resolved config a checkpoint was written with (flat field names)."""
    verify(path, only=("state.json",))
    try:
        return _read_json(path / "state.json")["config"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: no readable config in state.json ({err})") from None

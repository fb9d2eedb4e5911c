"""Training checkpoints that a kill at any instant cannot break, and the RNG states for an exact resume.

Layout under the output folder:

    OUT/checkpoints/step-000100/        a complete checkpoint: the model in the official formats (written
        llm/ vit/ projector/ ...        by the caller's write_fn), training_state.pt, and COMPLETE (JSON:
        training_state.pt               the step and the size of every file, checked on load)
        COMPLETE
    OUT/checkpoints/latest              one line, the name of the newest checkpoint ("step-000100")
    OUT/checkpoints/.tmp-step-000200-PID   a save in progress (or one that was killed)
    OUT/checkpoints/.old-step-000100-PID   a checkpoint being replaced by a newer save of the same step
    OUT/checkpoints/.del-step-000050-PID   a pruned checkpoint being deleted

Saving writes everything into the `.tmp-` folder, fsyncs every file and folder, and only then renames it
to `step-NNNNNN` (a rename within a folder is atomic on POSIX file systems); after that it rewrites `latest`
(temporary file + os.replace) and prunes older checkpoints (rename to `.del-`, then delete). So at every
instant the previous complete checkpoint is there, whole, and `latest_checkpoint` finds it: folders that
start with "." are never taken for checkpoints, and a folder without a valid COMPLETE is skipped.

Only one process writes (rank 0); gather what the other ranks hold (ZeRO optimizer shards, their RNG
states) before calling `save_checkpoint`.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .weights import CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINING_STATE = "training_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")
# Leftovers of an interrupted save: the folders above, and the temporary file of `latest`.
LEFTOVER = re.compile(r"^\.(?:(?P<kind>tmp|old|del)-step-(?P<step>\d+)|latest\.tmp)-(?P<pid>\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# --------------------------------------------------------------------------------------------------
# Durable writes

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the data files were synced already
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder bottom-up, so the data is on disk before the rename publishes it."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def _write_text_atomic(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    _fsync_path(file.parent)


def _remove(folder: Path) -> None:
    """Delete a folder so that it disappears at once: rename to a `.del-` name, then delete the contents."""
    doomed = folder.with_name(f".del-{folder.name}-{os.getpid()}")
    os.rename(folder, doomed)
    shutil.rmtree(doomed)


# --------------------------------------------------------------------------------------------------
# Completeness

def _manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is one."""
    folder = Path(folder)
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{COMPLETE} is unreadable ({e})"
    if not isinstance(files, dict) or TRAINING_STATE not in files:
        return f"{COMPLETE} lists no {TRAINING_STATE}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {COMPLETE} says {size} (truncated or replaced)"
    return None


def _complete_steps(ckpt_dir: Path) -> dict[int, Path]:
    found = {}
    for p in ckpt_dir.iterdir() if ckpt_dir.is_dir() else ():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and checkpoint_problem(p) is None:
            found[int(m.group(1))] = p
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clean_leftovers(out_dir: str | os.PathLike) -> list[str]:
    """Remove what killed saves left behind in OUT/checkpoints; returns what it removed or restored.

    Folders of processes still alive (another run writing into the same OUT) are left alone. A checkpoint
    caught in the middle of being replaced (`.old-`, with no `step-` folder of its step) is renamed back.
    Called by every save; call it at start-up too (rank 0 only).
    """
    ckpt_dir = Path(out_dir) / CHECKPOINTS
    done = []
    for p in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else ():
        m = LEFTOVER.match(p.name)
        if not m or (int(m["pid"]) != os.getpid() and _pid_alive(int(m["pid"]))):
            continue
        final = ckpt_dir / step_name(int(m["step"])) if m["step"] else None
        if m["kind"] == "old" and not final.exists() and checkpoint_problem(p) is None:
            os.rename(p, final)
            done.append(f"restored {final.name} from {p.name}")
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        done.append(f"removed {p.name}")
    return done


# --------------------------------------------------------------------------------------------------
# Save and find

def save_checkpoint(out_dir: str | os.PathLike, step: int, write_fn: Callable[[Path], None],
                    training_state: dict, keep: int | None = 2) -> Path:
    """Write OUT/checkpoints/step-NNNNNN atomically and point `latest` at it; returns its path.

    write_fn(folder) writes the model weights (official formats) into the given folder; training_state
    (optimizer, scheduler, step, RNG states, sampler position, world size, args) goes to training_state.pt.
    keep: how many complete checkpoints to keep, this one included (None keeps all). Only checkpoints of
    earlier steps are pruned. A checkpoint of the same step is replaced. Call it on one rank only.
    """
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep={keep}: a save must keep at least the checkpoint it writes (or None for all)")
    ckpt_dir = Path(out_dir) / CHECKPOINTS
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir)
    final = ckpt_dir / step_name(step)
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        write_fn(tmp)
        with open(tmp / TRAINING_STATE, "wb") as f:
            torch.save(training_state, f)
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": _manifest(tmp)}, indent=1) + "\n")
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    aside = ckpt_dir / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # a save of the same step: move the old one aside, never delete before replacing
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_path(ckpt_dir)
    if aside.exists():
        shutil.rmtree(aside)
    _write_text_atomic(ckpt_dir / LATEST, final.name + "\n")

    if keep is not None:
        older = sorted(s for s in _complete_steps(ckpt_dir) if s < step)
        for s in older[:max(0, len(older) - (keep - 1))]:
            _remove(ckpt_dir / step_name(s))
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it is complete, else the newest complete one.

    Returns None when OUT has no complete checkpoint. Says on stderr when it falls back, and why.
    """
    ckpt_dir = Path(out_dir) / CHECKPOINTS
    if not ckpt_dir.is_dir():
        return None
    pointer = ckpt_dir / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else ""
    if not STEP_DIR.match(named):
        why = f"{pointer} is missing or names no step folder ({named[:40]!r})"
    elif not (ckpt_dir / named).is_dir():
        why = f"'latest' names {named}, which is missing"
    elif problem := checkpoint_problem(ckpt_dir / named):
        why = f"'latest' names {named}, but {problem}"
    else:
        return ckpt_dir / named
    found = _complete_steps(ckpt_dir)
    # An interrupted replacement leaves the complete old checkpoint under `.old-` until the next clean-up.
    for p in ckpt_dir.iterdir():
        m = LEFTOVER.match(p.name)
        if m and m["kind"] == "old" and int(m["step"]) not in found and checkpoint_problem(p) is None:
            found[int(m["step"])] = p
    if not found:
        if pointer.exists():
            print(f"[checkpoint] {why}; no other complete checkpoint either", file=sys.stderr, flush=True)
        return None
    best = found[max(found)]
    print(f"[checkpoint] {why}; using {best}, the newest complete checkpoint", file=sys.stderr, flush=True)
    return best


def load_training_state(folder: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """The training_state dict of a complete checkpoint folder (tensors mapped to map_location)."""
    folder = Path(folder)
    problem = checkpoint_problem(folder)
    if problem:
        raise CheckpointError(f"{folder}: not a complete checkpoint: {problem}; resume from "
                              "latest_checkpoint(OUT) instead")
    # weights_only=True: a checkpoint from elsewhere cannot run code. The state holds tensors, numbers,
    # strings, None, lists, tuples and dicts only (see capture_rng_state; store args with paths as str).
    try:
        return torch.load(folder / TRAINING_STATE, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{folder / TRAINING_STATE}: holds an object other than tensors, numbers, "
                              f"strings, lists and dicts ({e}); save plain values in training_state") from e


# --------------------------------------------------------------------------------------------------
# Random number generators

def capture_rng_state() -> dict:
    """The states of Python's, NumPy's, torch's CPU and (if in use) the current CUDA device's generators.

    Plain lists and tensors only, so it loads with torch.load(weights_only=True). One process's state:
    under torchrun gather every rank's to resume each rank exactly.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    # Only a CUDA generator already in use: reading it would otherwise create a CUDA context.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the generator states returned by `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())

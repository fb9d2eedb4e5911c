"""Training checkpoints that a kill at any instant cannot break, the RNG states for an exact resume,
and the frozen parts of the output folder (linked or copied from their sources, never re-encoded).

    OUT/checkpoints/step-000100/training_state.pt
        trained tensors, optimizer, schedule, RNG, step, and each frozen part's source
        fingerprint instead of its weights
    OUT/checkpoints/step-000100/COMPLETE
        the step and the size of every file (shards/ under --fsdp)
    OUT/checkpoints/latest
        the name of the newest checkpoint ("step-000100")
    OUT/checkpoints/.tmp-step-000200-PID
        a save in progress (or killed); .old-: one being replaced by a save of the same step;
        .del-: a pruned one being deleted

A save fills `.tmp-`, fsyncs it, renames it to `step-NNNNNN` (atomic on POSIX), then rewrites
`latest` and prunes: at every instant the previous complete checkpoint is there, whole. Under FSDP
every rank writes its shards into `.tmp-` first (llava_min/fsdp.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import LlavaMinError
from .weights import CONFIG_FILE, write_atomic

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINING_STATE = "training_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")
# Leftovers of an interrupted save: the folders above, and the temporary file of `latest`.
LEFTOVER = re.compile(r"^\.(?:(?P<kind>tmp|old|del)-step-(?P<step>\d+)-|latest\.)"
                      r"(?P<pid>\d+)(?:\.tmp)?$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# Durable writes and completeness

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems refuse fsync on a folder; the data files were synced already.
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder bottom-up, so the data is on disk before the rename
    publishes it."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


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
            return (f"{name} has {path.stat().st_size} bytes, {COMPLETE} says {size} (truncated or "
                    "replaced)")
    return None


def _complete_steps(ckpt_dir: Path) -> dict[int, Path]:
    found = {}
    if not ckpt_dir.is_dir():
        return found
    for p in ckpt_dir.iterdir():
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
    """Remove what killed saves left in OUT/checkpoints, but not what live processes write;
    rename back a complete `.old-` checkpoint whose `step-` folder is missing. Every save calls
    it; call it at start-up on rank 0."""
    ckpt_dir = Path(out_dir) / CHECKPOINTS
    done = []
    if not ckpt_dir.is_dir():
        return done
    for p in sorted(ckpt_dir.iterdir()):
        m = LEFTOVER.match(p.name)
        if not m or (int(m["pid"]) != os.getpid() and _pid_alive(int(m["pid"]))):
            continue
        # A complete `.old-` checkpoint whose replacement never arrived goes back under its name.
        final = None
        if m["kind"] == "old":
            final = ckpt_dir / step_name(int(m["step"]))
        if final is not None and not final.exists() and checkpoint_problem(p) is None:
            os.rename(p, final)
            done.append(f"restored {final.name} from {p.name}")
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        done.append(f"removed {p.name}")
    return done


# Save and find

def save_checkpoint(out_dir: str | os.PathLike, step: int, training_state: dict,
                    keep: int | None = 2, write_fn: Callable[[Path], None] | None = None) -> Path:
    """Write OUT/checkpoints/step-NNNNNN (replacing one of the same step) atomically on one
    rank, with the files write_fn(folder) adds; point `latest` at it, keep the newest `keep`
    (None: all); returns its path."""
    tmp = begin_checkpoint(out_dir, step)
    return publish_checkpoint(out_dir, step, tmp, training_state, keep, write_fn)


def begin_checkpoint(out_dir: str | os.PathLike, step: int) -> Path:
    """The first half of `save_checkpoint` for saves that several ranks write: the empty `.tmp-`
    folder. One rank calls it, all may write into it, then that rank calls `publish_checkpoint`
    (llava_min/fsdp.py)."""
    ckpt_dir = Path(out_dir) / CHECKPOINTS
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir)
    tmp = ckpt_dir / f".tmp-{step_name(step)}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def publish_checkpoint(out_dir: str | os.PathLike, step: int, tmp: Path, training_state: dict,
                       keep: int | None = 2,
                       write_fn: Callable[[Path], None] | None = None) -> Path:
    """The second half: write_fn's files, training_state.pt and COMPLETE (listing every file in
    `tmp`, the other writers' included) into `tmp`, fsync, rename to step-NNNNNN, point `latest`
    at it, prune."""
    ckpt_dir = Path(out_dir) / CHECKPOINTS
    final = ckpt_dir / step_name(step)
    try:
        if keep is not None and keep < 1:
            raise LlavaMinError(f"keep={keep}: a save must keep at least the checkpoint it writes "
                                "(or None for all)")
        if write_fn is not None:
            write_fn(tmp)
        with open(tmp / TRAINING_STATE, "wb") as f:
            torch.save(training_state, f)
        written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in written}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    aside = ckpt_dir / f".old-{final.name}-{os.getpid()}"
    # A save of the same step: move the old one aside, never delete before replacing.
    if final.exists():
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_path(ckpt_dir)
    if aside.exists():
        shutil.rmtree(aside)
    write_atomic(ckpt_dir / LATEST, final.name + "\n")
    _fsync_path(ckpt_dir)

    if keep is not None:
        older = sorted(s for s in _complete_steps(ckpt_dir) if s < step)
        for s in older[:max(0, len(older) - (keep - 1))]:
            doomed = ckpt_dir / f".del-{step_name(s)}-{os.getpid()}"
            # Gone at once; the contents are deleted after.
            os.rename(ckpt_dir / step_name(s), doomed)
            shutil.rmtree(doomed)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it is complete, else (saying why
    on stderr) the newest complete one; None when there is none."""
    ckpt_dir = Path(out_dir) / CHECKPOINTS
    if not ckpt_dir.is_dir():
        return None
    pointer = ckpt_dir / LATEST
    named = ""
    if pointer.is_file():
        named = pointer.read_text().strip()
    if not STEP_DIR.match(named):
        why = f"{pointer} is missing or names no step folder ({named[:40]!r})"
    elif not (ckpt_dir / named).is_dir():
        why = f"'latest' names {named}, which is missing"
    elif problem := checkpoint_problem(ckpt_dir / named):
        why = f"'latest' names {named}, but {problem}"
    else:
        return ckpt_dir / named
    found = _complete_steps(ckpt_dir)
    # An interrupted replacement leaves the complete old checkpoint under `.old-` until the next
    # clean-up.
    for p in ckpt_dir.iterdir():
        m = LEFTOVER.match(p.name)
        if not m or m["kind"] != "old" or int(m["step"]) in found:
            continue
        if checkpoint_problem(p) is None:
            found[int(m["step"])] = p
    if not found:
        if pointer.exists():
            print(f"[checkpoint] {why}; no other complete checkpoint either", file=sys.stderr, flush=True)
        return None
    best = found[max(found)]
    print(f"[checkpoint] {why}; using {best}, the newest complete checkpoint", file=sys.stderr, flush=True)
    return best


def load_training_state(folder: str | os.PathLike,
                        map_location: str | torch.device | None = "cpu") -> dict:
    """The training_state dict of a complete checkpoint folder (tensors mapped to map_location)."""
    folder = Path(folder)
    if problem := checkpoint_problem(folder):
        raise LlavaMinError(f"{folder}: not a complete checkpoint: {problem}; resume from "
                            "latest_checkpoint(OUT)")
    # weights_only=True: a checkpoint from elsewhere cannot run code. Plain values only (see
    # capture_rng_state).
    try:
        return torch.load(folder / TRAINING_STATE, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise LlavaMinError(f"{folder / TRAINING_STATE}: holds an object other than tensors, "
                            f"numbers, strings, lists and dicts ({e}); save plain values in "
                            "training_state") from e


def check_trained(saved: set[str], model: torch.nn.Module, ckpt: Path) -> None:
    """Refuse to resume when the checkpoint's trained tensors are not the ones this run trains."""
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if saved != wanted:
        raise SystemExit(f"{ckpt}: trained tensors differ from this run's (only in checkpoint: "
                         f"{sorted(saved - wanted)[:3]}, only in this run: {sorted(wanted - saved)[:3]}); resume "
                         "with the same --train / --lora-r")


# Frozen sources: a checkpoint names them instead of holding their weights

# Blocks of each safetensors file's data hashed into its fingerprint: 16 of 64 KiB.
SAMPLED_BLOCKS = 16
BLOCK_BYTES = 1 << 16
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _safetensors_header(file: Path) -> bytes:
    with open(file, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


def source_fingerprint(folder: str | os.PathLike) -> dict:
    """What identifies a frozen part's weights without storing them, read in milliseconds: each
    weight file's size and a hash of its safetensors header (names, dtypes, shapes, offsets) and
    of 16 blocks of 64 KiB spread over its data (another model of the same shapes differs
    there)."""
    folder = Path(folder)
    files = {}
    for file in sorted(folder.iterdir()):
        weights = file.name.endswith((".safetensors", ".safetensors.index.json"))
        if not file.is_file() or not (weights or file.name == CONFIG_FILE):
            continue
        h = hashlib.sha256()
        size = file.stat().st_size
        with open(file, "rb") as f:
            if file.suffix != ".safetensors":
                h.update(f.read())
            else:
                header = _safetensors_header(file)
                h.update(header)
                start = 8 + len(header)
                span = max(0, size - start - BLOCK_BYTES)
                for i in range(SAMPLED_BLOCKS):
                    f.seek(start + span * i // (SAMPLED_BLOCKS - 1))
                    h.update(f.read(BLOCK_BYTES))
        files[file.name] = [size, h.hexdigest()[:20]]
    return {"path": str(folder.resolve()), "files": files}


def check_sources(saved: dict, now: dict, ckpt: Path) -> None:
    """Refuse to resume when a frozen part's source is not the one the checkpoint was trained
    against."""
    for part, then in saved.items():
        current = now.get(part)
        if current is None:
            raise SystemExit(f"{ckpt}: {part} was frozen when this checkpoint was saved and trains "
                             "now; resume with the same --train / --lora-r")
        if ("fresh" in then or "fresh" in current) and then != current:
            raise SystemExit(f"{ckpt}: the frozen {part} was built from {then}, now from {current}; "
                             "resume with the same --llm/--vit/--*-config and --seed as the run that "
                             "saved it")
        for name in sorted(set(then.get("files", ())) | set(current.get("files", ()))):
            was = then["files"].get(name)
            now_is = current["files"].get(name)
            if was == now_is:
                continue
            if now_is is None:
                what = "is missing now"
            elif was is None:
                what = "is new"
            elif was[0] != now_is[0]:
                what = f"changed ({was[0]} -> {now_is[0]} bytes)"
            else:
                what = "changed (other contents)"
            raise SystemExit(f"{ckpt}: the frozen {part} differs from the one this checkpoint was "
                             f"trained with: {Path(current['path']) / name} {what} (it was "
                             f"{Path(then['path']) / name}). Resume needs the same frozen weights: "
                             "restore that file, or start a new run in another --out")


def stored_dtype(folder: str | os.PathLike) -> torch.dtype:
    """The floating dtype most tensors of a checkpoint folder are stored in (bf16 for the
    released models)."""
    counts = Counter()
    for file in sorted(Path(folder).glob("*.safetensors")):
        header = json.loads(_safetensors_header(file))
        for key, entry in header.items():
            if key != "__metadata__" and entry["dtype"] in _DTYPES:
                counts[entry["dtype"]] += 1
    if not counts:
        return torch.float32
    return _DTYPES[counts.most_common(1)[0][0]]


def publish_frozen(source: str | os.PathLike, dest: str | os.PathLike, mode: str = "link") -> str:
    """Put a frozen part's files into the output folder without re-encoding them; returns what
    it did. "link": hard links (a copy where the file system refuses), "copy": byte-for-byte
    copies (both outlive the source), "ref": `dest` becomes a symbolic link to the source folder
    (nothing written; breaks if the source moves)."""
    source = Path(source).resolve()
    dest = Path(dest)
    # The output folder is the source already.
    if dest.resolve() == source:
        return "kept"
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.is_dir():
        # An earlier output; removing links never touches the source.
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "ref":
        dest.symlink_to(source, target_is_directory=True)
        return "a symbolic link to"
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    copied = 0
    for file in sorted(f for f in source.iterdir() if f.is_file() and not f.name.startswith(".")):
        if mode == "link":
            try:
                os.link(file, tmp / file.name)
                continue
            except OSError:
                # E.g. EXDEV (another file system): copy instead.
                pass
        shutil.copyfile(file, tmp / file.name)      # new files take their mode from the umask
        copied += 1
    _fsync_tree(tmp)
    os.rename(tmp, dest)
    if not copied:
        return "hard-linked from"
    if mode == "copy":
        return "copied from"
    return "copied (no hard links) from"


# Random number generators

def capture_rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and (if in use) CUDA generator states, as plain
    lists and tensors (so it loads with weights_only=True). Under torchrun, gather every rank's."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
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

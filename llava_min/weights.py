"""Checkpoint files in the Hugging Face safetensors layouts, and the project's one atomic file writer.

A model folder holds config.json and model.safetensors, or shards model-0000K-of-0000N.safetensors listed by
model.safetensors.index.json. Start at `load_into` (strict, memory-mapped) and `save_state` (sharded, atomic).
"""
from __future__ import annotations

import copy
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import LlavaMinError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path` to write; on success it is synced and renamed to `path` in one step,
    so a reader (or a run killed midway) sees the old file or the new one, with the mode open() would give."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # same folder: os.replace never crosses devices
    try:
        tmp.unlink(missing_ok=True)         # a leftover of a killed run would keep its own mode
        tmp.touch()
        mode = tmp.stat().st_mode & 0o777   # what open() gives; safetensors (and tempfile.mkstemp) give 0600
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())            # the bytes reach the disk before the name points at them
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a whole file atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(obj, path: str | os.PathLike) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def load_config(name_or_path: str | os.PathLike, presets: dict, from_dict: Callable, model: str):
    """A copy of a preset (by name), or from_dict(config.json) of a file or a model folder; errors name the file."""
    if str(name_or_path) in presets:
        return copy.deepcopy(presets[str(name_or_path)])
    path = Path(name_or_path)
    if not path.exists():
        raise LlavaMinError(f"{path}: neither a {model} preset ({', '.join(presets)}) nor an existing config.json "
                            "file or model folder")
    file = path / CONFIG_FILE if path.is_dir() else path
    d = read_config(file)
    try:
        return from_dict(d)
    except LlavaMinError as e:
        raise LlavaMinError(f"{file}: {e}") from None   # the file, then what is wrong in it


def read_config(file: Path) -> dict:
    if not file.exists():
        raise LlavaMinError(f"{file}: no config.json here; a model folder holds config.json and "
                            f"{SINGLE_FILE} (or shards with {INDEX_FILE})")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LlavaMinError(f"{file}: not valid JSON ({e})") from e


# Loading

def checkpoint_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Every tensor key of a checkpoint folder -> the file that holds it, the index checked against the shards."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LlavaMinError(f"{folder}: not a folder (expected a model folder with config.json and "
                            f"{SINGLE_FILE} or {INDEX_FILE})")
    index = folder / INDEX_FILE
    if not index.exists():
        single = folder / SINGLE_FILE
        if single.exists():
            return {k: single for k in _keys_of(single)}
        found = sorted(p.name for p in folder.iterdir())
        raise LlavaMinError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found[:12]}). "
                            "Only safetensors checkpoints are read; convert .bin/.pth files first.")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LlavaMinError(f"{index}: not a safetensors index (need a 'weight_map' object): {e}") from e
    for name in dict.fromkeys(weight_map.values()):
        shard, keys = folder / name, [k for k, n in weight_map.items() if n == name]
        if not shard.exists():
            raise LlavaMinError(f"{shard}: shard named by {index.name} is missing; it should hold {len(keys)} "
                                f"tensors (e.g. {keys[0]!r}). Download it again or fix the index.")
        absent = sorted(set(keys) - set(_keys_of(shard)))
        if absent:
            raise LlavaMinError(f"{shard}: {index.name} says it holds {absent[0]!r} ({len(absent)} keys in all) "
                                "but the shard does not")
    return {key: folder / name for key, name in weight_map.items()}


def _keys_of(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for a truncated or corrupt header
        raise LlavaMinError(f"{file}: cannot read safetensors header ({e}); the file is truncated "
                            "or corrupt, download it again") from e


def rename_key(key: str, key_map: Iterable[tuple[str, str]]) -> str:
    """Apply the first matching (regex, replacement) of a key map to a checkpoint key."""
    for pattern, repl in key_map:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def build_on_meta(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module without allocating or initialising its weights (they come from the checkpoint)."""
    with torch.device("meta"):
        return make()


_COUNTS: dict[str, int] = {}


def numel_on_meta(make: Callable[[], torch.nn.Module], key: str) -> int:
    """Elements of every tensor in make()'s state dict, built on meta, cached by `key` (the config's repr):
    the memory estimator asks for the same counts hundreds of times, and each build takes ~0.1 s."""
    if key not in _COUNTS:
        _COUNTS[key] = sum(t.numel() for t in build_on_meta(make).state_dict().values())
    return _COUNTS[key]


def load_into(module: torch.nn.Module, folder: str | os.PathLike, *, key_map: Iterable[tuple[str, str]] = (),
              ignore: Iterable[str] = (), dtype: torch.dtype | None = None, device="cpu") -> list[str]:
    """Fill `module` (built with `build_on_meta`) from a checkpoint folder, strictly: a missing, unexpected or
    mis-shaped tensor is an error naming the key, the file and both shapes. key_map: (regex, replacement) pairs,
    checkpoint key -> module key, first match wins; ignore: regexes of checkpoint keys nobody reads; dtype: of the
    floating tensors (None: as stored). Returns the checkpoint keys left unread (those `ignore` matched)."""
    key_map, ignore = list(key_map), [re.compile(p) for p in ignore]
    files = checkpoint_files(folder)
    expected = module.state_dict(keep_vars=True)
    target_of = {k: rename_key(k, key_map) for k in files if not any(p.search(k) for p in ignore)}   # ckpt -> module
    source_of: dict[str, str] = {}       # module key -> checkpoint key
    for ckpt_key, mod_key in target_of.items():
        if mod_key in source_of:
            raise LlavaMinError(f"{files[ckpt_key]}: keys {source_of[mod_key]!r} and {ckpt_key!r} both map to "
                                f"{mod_key!r}; the checkpoint mixes two naming schemes")
        source_of[mod_key] = ckpt_key
    unexpected = [k for k, m in target_of.items() if m not in expected]
    if unexpected:
        k = unexpected[0]
        raise LlavaMinError(f"{files[k]}: unexpected tensor {k!r} ({len(unexpected)} unexpected in all: "
                            f"{unexpected[:5]}); is this the right model type and config.json?")
    missing = sorted(set(expected) - set(source_of))
    if missing:
        raise LlavaMinError(f"{Path(folder)}: missing tensor {missing[0]!r} ({len(missing)} missing in all: "
                            f"{missing[:5]}); the checkpoint is incomplete or for another config")

    # Each tensor is read once: safe_open maps the file into memory, get_tensor views it without copying, and
    # .to() makes the one copy there is (on `device`, in `dtype`), or none for a CPU load in the stored dtype.
    # So the peak is about the model's final size: a bf16 checkpoint never exists as an fp32 host copy.
    state = {}
    for file in dict.fromkeys(files.values()):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for ckpt_key in (k for k in f.keys() if k in target_of):
                t = f.get_tensor(ckpt_key)      # a truncated file fails earlier, at its header (_keys_of)
                mod_key, want = target_of[ckpt_key], expected[target_of[ckpt_key]]
                if t.shape != want.shape:
                    raise LlavaMinError(f"{file}: tensor {ckpt_key!r} has shape {tuple(t.shape)} but the model's "
                                        f"{mod_key!r} is {tuple(want.shape)}; config.json does not match the weights")
                state[mod_key] = t.to(device=device, dtype=dtype if dtype and t.is_floating_point() else t.dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return sorted(set(files) - set(target_of))


def summarise_keys(keys: list[str], nested: tuple[str, ...] = ("vision_model",)) -> str:
    """Checkpoint keys in one line, grouped by their first name (two for a `nested` one), as
    "text_model.* (23 tensors), vision_model.head.* (11 tensors), logit_scale"."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        names = key.split(".")
        depth = 2 if names[0] in nested else 1
        groups.setdefault(".".join(names[:depth]), []).append(key)
    parts = []
    for head, members in groups.items():
        if len(members) == 1:
            parts.append(members[0])
        else:
            parts.append(f"{head}.* ({len(members)} tensors)")
    return ", ".join(parts)


# Saving

def save_state(state: dict[str, torch.Tensor], folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
               max_shard_bytes: int = 5 * 2**30) -> None:
    """Write tensors as model.safetensors, or as shards plus an index past max_shard_bytes, each file atomically;
    floating tensors are cast to `dtype` (None: as they are) one shard at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cast = {k: dtype if dtype is not None and t.is_floating_point() else t.dtype for k, t in state.items()}
    nbytes = {k: t.numel() * cast[k].itemsize for k, t in state.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for k in state:
        if shards[-1] and size + nbytes[k] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes[k]
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    (folder / INDEX_FILE).unlink(missing_ok=True)   # the index is written last: until then no reader follows it
    for name, keys in zip(names, shards):
        tensors = {k: state[k].detach().to("cpu", dtype=cast[k]).contiguous() for k in keys}
        with atomic_path(folder / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    for stale in set(folder.glob("model*.safetensors")) - {folder / n for n in names}:
        stale.unlink()
    if len(shards) > 1:
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        write_json({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, folder / INDEX_FILE)

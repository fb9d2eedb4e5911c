"""Checkpoint files in the Hugging Face safetensors layouts, and the project's one atomic file writer.

A model folder holds config.json and model.safetensors, or shards model-0000K-of-0000N.safetensors
listed by model.safetensors.index.json. Start at `load_into` (strict, memory-mapped), `save_state`
(sharded, atomic) and `save_streamed` (the same layout, written one tensor at a time).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import struct
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
    """Yield a temporary path beside `path` to write; on success it is synced and renamed to `path`
    in one step, so a reader (or a run killed midway) sees the old file or the new one, with the
    mode open() would give."""
    path = Path(path)
    # In the same folder: os.replace never crosses devices.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # A leftover of a killed run would keep its own mode.
        tmp.unlink(missing_ok=True)
        tmp.touch()
        # What open() gives; safetensors (and tempfile.mkstemp) give 0600.
        mode = tmp.stat().st_mode & 0o777
        yield tmp
        os.chmod(tmp, mode)
        # The bytes reach the disk before the name points at them.
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a whole file atomically (see `atomic_path`)."""
    if isinstance(data, str):
        data = data.encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(obj, path: str | os.PathLike) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def load_config(name_or_path: str | os.PathLike, presets: dict, from_dict: Callable, model: str):
    """A copy of a preset (by name), or from_dict(config.json) of a file or a model folder; errors
    name the file."""
    if str(name_or_path) in presets:
        return copy.deepcopy(presets[str(name_or_path)])
    path = Path(name_or_path)
    if not path.exists():
        raise LlavaMinError(f"{path}: neither a {model} preset ({', '.join(presets)}) nor an existing "
                            "config.json file or model folder")
    file = path
    if path.is_dir():
        file = path / CONFIG_FILE
    d = read_config(file)
    try:
        return from_dict(d)
    except LlavaMinError as e:
        # The file, then what is wrong in it.
        raise LlavaMinError(f"{file}: {e}") from None


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
    """Every tensor key of a checkpoint folder -> the file that holds it, the index checked against
    the shards."""
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
        raise LlavaMinError(f"{index}: not a safetensors index (need a 'weight_map' object): "
                            f"{e}") from e
    for name in dict.fromkeys(weight_map.values()):
        shard = folder / name
        keys = [k for k, n in weight_map.items() if n == name]
        if not shard.exists():
            raise LlavaMinError(f"{shard}: shard named by {index.name} is missing; it should hold "
                                f"{len(keys)} tensors (e.g. {keys[0]!r}). Download it again or fix "
                                "the index.")
        absent = sorted(set(keys) - set(_keys_of(shard)))
        if absent:
            raise LlavaMinError(f"{shard}: {index.name} says it holds {absent[0]!r} ({len(absent)} "
                                "keys in all) but the shard does not")
    return {key: folder / name for key, name in weight_map.items()}


def _keys_of(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    # safetensors raises its own SafetensorError for a truncated or corrupt header.
    except Exception as e:
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
    """Elements of every tensor in make()'s state dict, built on meta, cached by `key` (the config's
    repr): the memory estimator asks for the same counts hundreds of times; a build takes ~0.1 s."""
    if key not in _COUNTS:
        _COUNTS[key] = sum(t.numel() for t in build_on_meta(make).state_dict().values())
    return _COUNTS[key]


def load_into(module: torch.nn.Module, folder: str | os.PathLike, *,
              key_map: Iterable[tuple[str, str]] = (), ignore: Iterable[str] = (),
              dtype: torch.dtype | None = None, device="cpu") -> list[str]:
    """Fill `module` (built with `build_on_meta`) from a checkpoint folder, strictly: a missing,
    unexpected or mis-shaped tensor is an error naming the key, the file and both shapes.
    key_map: (regex, replacement) pairs, checkpoint key -> module key, first match wins;
    ignore: regexes of checkpoint keys nobody reads; dtype: of the floating tensors (None: as
    stored). Returns the checkpoint keys left unread (those `ignore` matched)."""
    key_map = list(key_map)
    ignore = [re.compile(p) for p in ignore]
    files = checkpoint_files(folder)
    expected = module.state_dict(keep_vars=True)
    # checkpoint key -> module key
    target_of = {k: rename_key(k, key_map) for k in files if not any(p.search(k) for p in ignore)}
    # module key -> checkpoint key
    source_of: dict[str, str] = {}
    for ckpt_key, mod_key in target_of.items():
        if mod_key in source_of:
            raise LlavaMinError(f"{files[ckpt_key]}: keys {source_of[mod_key]!r} and {ckpt_key!r} "
                                f"both map to {mod_key!r}; the checkpoint mixes two naming schemes")
        source_of[mod_key] = ckpt_key
    unexpected = [k for k, m in target_of.items() if m not in expected]
    if unexpected:
        k = unexpected[0]
        raise LlavaMinError(f"{files[k]}: unexpected tensor {k!r} ({len(unexpected)} unexpected in "
                            f"all: {unexpected[:5]}); is this the right model type and config.json?")
    missing = sorted(set(expected) - set(source_of))
    if missing:
        raise LlavaMinError(f"{Path(folder)}: missing tensor {missing[0]!r} ({len(missing)} missing "
                            f"in all: {missing[:5]}); the checkpoint is incomplete or for another "
                            "config")

    # Each tensor is read once: safe_open maps the file into memory, get_tensor views it without
    # copying, and .to() makes the one copy there is (on `device`, in `dtype`), or none for a CPU
    # load in the stored dtype. So the peak is about the model's final size: a bf16 checkpoint
    # never exists as an fp32 host copy.
    state = {}
    for file in dict.fromkeys(files.values()):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for ckpt_key in (k for k in f.keys() if k in target_of):
                # A truncated file fails earlier, at its header (_keys_of).
                t = f.get_tensor(ckpt_key)
                mod_key = target_of[ckpt_key]
                want = expected[mod_key]
                if t.shape != want.shape:
                    raise LlavaMinError(
                        f"{file}: tensor {ckpt_key!r} has shape {tuple(t.shape)} but the model's "
                        f"{mod_key!r} is {tuple(want.shape)}; config.json does not match the weights")
                to_dtype = t.dtype
                if dtype and t.is_floating_point():
                    to_dtype = dtype
                state[mod_key] = t.to(device=device, dtype=to_dtype)
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

def save_state(state: dict[str, torch.Tensor], folder: str | os.PathLike, *,
               dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write tensors as model.safetensors, or as shards plus an index past max_shard_bytes, each file
    atomically; floating tensors are cast to `dtype` (None: as they are) one shard at a time."""
    folder = Path(folder)
    cast = {}
    for k, t in state.items():
        cast[k] = t.dtype
        if dtype is not None and t.is_floating_point():
            cast[k] = dtype
    nbytes = {k: t.numel() * cast[k].itemsize for k, t in state.items()}
    shards = _shards(nbytes, max_shard_bytes)
    _start_writing(folder, shards)
    for name, keys in shards.items():
        tensors = {k: state[k].detach().to("cpu", dtype=cast[k]).contiguous() for k in keys}
        with atomic_path(folder / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    _finish_writing(folder, shards, nbytes)


def save_streamed(plan: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  make: Callable[[str], torch.Tensor], folder: str | os.PathLike, *,
                  max_shard_bytes: int = 5 * 2**30) -> int:
    """Write tensors that exist one at a time, in save_state's layout. plan maps each key to its
    (shape, dtype), which gives every file's header before any tensor exists; make(key) then returns
    each tensor in plan order and its bytes go straight to the file. The peak memory is one tensor,
    whatever the model's size. Returns the bytes of tensor data written."""
    folder = Path(folder)
    nbytes = {key: math.prod(shape) * dtype.itemsize for key, (shape, dtype) in plan.items()}
    shards = _shards(nbytes, max_shard_bytes)
    _start_writing(folder, shards)
    for name, keys in shards.items():
        _write_safetensors(folder / name, {k: plan[k] for k in keys}, make)
    _finish_writing(folder, shards, nbytes)
    return sum(nbytes.values())


def _shards(nbytes: dict[str, int], max_shard_bytes: int) -> dict[str, list[str]]:
    """File name -> its keys, in order: a new shard where the next tensor would pass
    max_shard_bytes."""
    groups: list[list[str]] = [[]]
    size = 0
    for k, n in nbytes.items():
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    n = len(groups)
    return {f"model-{i:05d}-of-{n:05d}.safetensors": keys for i, keys in enumerate(groups, 1)}


def _start_writing(folder: Path, shards: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # The index is written last: until then no reader follows it.
    (folder / INDEX_FILE).unlink(missing_ok=True)


def _finish_writing(folder: Path, shards: dict[str, list[str]], nbytes: dict[str, int]) -> None:
    """Remove the shards of an earlier save that this one did not write; write the index of a
    sharded save."""
    for stale in set(folder.glob("model*.safetensors")) - {folder / name for name in shards}:
        stale.unlink()
    if len(shards) > 1:
        weight_map = {k: name for name, keys in shards.items() for k in keys}
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        write_json(index, folder / INDEX_FILE)


# The safetensors header's names of the dtypes (github.com/huggingface/safetensors, format.md)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _write_safetensors(path: Path, plan: dict[str, tuple[tuple[int, ...], torch.dtype]],
                       make: Callable[[str], torch.Tensor]) -> None:
    """One safetensors file, atomically: an 8-byte little-endian header length, the JSON header (each
    tensor's dtype, shape and byte range), then the tensors' bytes in plan order, each written as
    make(key) returns it."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (shape, dtype) in plan.items():
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    # Spaces pad the header so that the data starts 8-byte aligned, as safetensors' own writer does.
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key, (shape, dtype) in plan.items():
            t = make(key)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise AssertionError(f"{key}: made {tuple(t.shape)} {t.dtype}, planned "
                                     f"{tuple(shape)} {dtype}")
            # The tensor's bytes as they lie in memory: safetensors stores little-endian, as x86
            # and ARM do.
            f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)

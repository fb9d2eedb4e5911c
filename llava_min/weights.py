"""Reading and writing checkpoints in the official Hugging Face safetensors layouts.

One folder holds either `model.safetensors`, or shards `model-0000K-of-0000N.safetensors` listed by
`model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}).

Loading is strict and memory-frugal:
  * the model is built on the meta device (no memory, no random init), see `build_on_meta`;
  * each tensor is read from the memory-mapped file straight into the target dtype and device and
    assigned into the module (`load_state_dict(assign=True)`), so a bf16 7B checkpoint loads with a
    peak RAM of about its own size and never exists as an fp32 copy;
  * a missing, unexpected or mis-shaped tensor, a missing or truncated shard, raises `CheckpointError`
    naming the key, the file and both shapes. Nothing is skipped with a warning.

Each model file owns its key map (checkpoint name -> module name) as data and passes it here.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder or file does not match what the model expects."""


# --------------------------------------------------------------------------------------------------
# config.json

def read_config(path: str | os.PathLike) -> dict:
    """The `config.json` of a model folder (or a config file itself) as a dict."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"{file}: no config.json here; a model folder holds config.json and "
                              f"{SINGLE_FILE} (or shards with {INDEX_FILE})")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e


def write_json(obj, file: str | os.PathLike) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    file = Path(file)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, file)


# --------------------------------------------------------------------------------------------------
# Locating tensors

def checkpoint_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor key of a checkpoint folder to the file that holds it, checking the index.

    Raises CheckpointError for a folder without weights, an index that names a missing shard, or an index
    whose keys are not in the shard it names.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a model folder with config.json and "
                              f"{SINGLE_FILE} or {INDEX_FILE})")
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (need a 'weight_map' object): {e}") from e
        by_file: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(name, []).append(key)
        key_to_file: dict[str, Path] = {}
        for name, keys in by_file.items():
            shard = folder / name
            if not shard.exists():
                raise CheckpointError(
                    f"{shard}: shard named by {index.name} is missing; it should hold {len(keys)} tensors "
                    f"(e.g. {keys[0]!r}). Download it again or fix the index.")
            present = set(_keys_of(shard))
            absent = [k for k in keys if k not in present]
            if absent:
                raise CheckpointError(f"{shard}: {index.name} says it holds {absent[0]!r} "
                                      f"({len(absent)} keys in all) but the shard does not")
            for k in keys:
                key_to_file[k] = shard
        return key_to_file
    single = folder / SINGLE_FILE
    if single.exists():
        return {k: single for k in _keys_of(single)}
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found[:12]}). "
                          "Only safetensors checkpoints are read; convert .bin/.pth files first.")


def _keys_of(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors header ({e}); the file is truncated "
                              "or corrupt, download it again") from e


def rename_key(key: str, key_map: Iterable[tuple[str, str]]) -> str:
    """Apply the first matching (regex, replacement) of a key map to a checkpoint key."""
    for pattern, repl in key_map:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# --------------------------------------------------------------------------------------------------
# Loading into a module

def build_on_meta(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module without allocating or initialising its weights (they come from the checkpoint)."""
    with torch.device("meta"):
        return make()


def load_into(
    module: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    key_map: Iterable[tuple[str, str]] = (),
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> None:
    """Load a checkpoint folder into `module` (usually built with `build_on_meta`), strictly.

    key_map:    (regex, replacement) pairs, checkpoint key -> module key; first match wins.
    transforms: module key regex -> function applied to the tensor after reading (e.g. a layout change).
    ignore:     regexes of checkpoint keys that are read by nobody (e.g. buffers other tools save).
    dtype:      floating tensors are cast to it while reading; None keeps the checkpoint's dtype.
    """
    key_map, ignore = list(key_map), [re.compile(p) for p in ignore]
    transforms = {re.compile(k): v for k, v in (transforms or {}).items()}
    files = checkpoint_files(folder)
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items()}

    target_of: dict[str, str] = {}
    for ckpt_key in files:
        if any(p.search(ckpt_key) for p in ignore):
            continue
        mod_key = rename_key(ckpt_key, key_map)
        if mod_key in target_of.values():
            first = next(k for k, v in target_of.items() if v == mod_key)
            raise CheckpointError(f"{files[ckpt_key]}: keys {first!r} and {ckpt_key!r} both map to {mod_key!r}; "
                                  "the checkpoint mixes two naming schemes")
        target_of[ckpt_key] = mod_key

    unexpected = [k for k, m in target_of.items() if m not in expected]
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(f"{files[k]}: unexpected tensor {k!r} ({len(unexpected)} unexpected in all: "
                              f"{unexpected[:5]}); is this the right model type and config.json?")
    missing = sorted(set(expected) - set(target_of.values()))
    if missing:
        raise CheckpointError(f"{Path(folder)}: missing tensor {missing[0]!r} ({len(missing)} missing in all: "
                              f"{missing[:5]}); the checkpoint is incomplete or for another config")

    # Open each file once; read tensor by tensor, cast on the way.
    handles = {}
    state = {}
    try:
        for ckpt_key, mod_key in target_of.items():
            file = files[ckpt_key]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt", device="cpu").__enter__()
            try:
                t = handles[file].get_tensor(ckpt_key)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {ckpt_key!r} ({e}); the file is "
                                      "truncated or corrupt, download it again") from e
            for pattern, fn in transforms.items():
                if pattern.search(mod_key):
                    t = fn(t)
            want = expected[mod_key]
            if tuple(t.shape) != tuple(want.shape):
                raise CheckpointError(f"{file}: tensor {ckpt_key!r} has shape {tuple(t.shape)} but the model's "
                                      f"{mod_key!r} is {tuple(want.shape)}; config.json does not match the weights")
            cast = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            state[mod_key] = t.to(device=device, dtype=cast)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    module.load_state_dict(state, strict=True, assign=True)


# --------------------------------------------------------------------------------------------------
# Saving

def save_state(state: dict[str, torch.Tensor], folder: str | os.PathLike, *,
               max_shard_bytes: int = 5 * 2**30) -> None:
    """Write tensors as `model.safetensors`, or as shards plus an index when larger than max_shard_bytes.

    Files are written to temporary names and renamed, so a reader never sees a half-written file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    for stale in list(folder.glob("model*.safetensors")) + [folder / INDEX_FILE]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        _save_file(shards[0], folder / SINGLE_FILE)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_file(shard, folder / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, folder / INDEX_FILE)


def _save_file(tensors: dict[str, torch.Tensor], file: Path) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, file)

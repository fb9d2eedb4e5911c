"""Stage 1 at InternLM2-1.8B's width and vocabulary: peak RSS, bytes written, load time (issue: real size).

Builds (once, cached) a random-weight checkpoint in the released format: bf16, config.json, two shards and
model.safetensors.index.json. Then, in fresh processes: (a) load it and touch every weight, (b) train.py
stage 1 (projector only, tiny ViT at 28 px, the real tokenizer) for 2 steps with a checkpoint at each,
--dtype bfloat16. Prints peak RSS against the checkpoint's bytes, bytes written in OUT (hard links to the
source not counted: they write nothing), and checks that OUT's LLM is the source, bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llava_min.internlm2 import PRESETS, InternLM2  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "assets" / "internlm2_tokenizer.model"


def build_checkpoint(folder: Path, layers: int) -> int:
    """Random bf16 weights of internlm2-1_8b's shape (first `layers` layers), two shards; returns its bytes."""
    config = PRESETS["internlm2-1_8b"]
    config = type(config)(**{**config.__dict__, "num_hidden_layers": layers})
    if (folder / "model.safetensors.index.json").exists():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in InternLM2(config).state_dict().items()}
    keys = list(shapes)
    halves = [keys[:len(keys) // 2], keys[len(keys) // 2:]]
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(halves, 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        shard = {k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in names}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in names})
        del shard
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": "bfloat16"}))
    return total


# A fresh interpreter whose only child is the command: its RUSAGE_CHILDREN peak is that command's own.
_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
         "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r)")


def measured(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run cmd in a fresh process: (result, seconds, peak RSS of that process in bytes)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", _PEAK, *map(str, cmd)], capture_output=True, text=True, **kw)
    dt = time.time() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    peak = [line for line in p.stderr.splitlines() if line.startswith("peak-rss-kib")][-1]
    return p, dt, int(peak.split()[1]) * 1024.0


def written_bytes(out: Path, source: Path) -> int:
    """Bytes of the files under out, except hard links to the source's files (the same inodes)."""
    linked = {f.stat().st_ino for f in source.iterdir()}
    seen, total = set(), 0
    for f in out.rglob("*"):
        if f.is_file() and not f.is_symlink():
            st = f.stat()
            if st.st_ino not in linked and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def stage1(args) -> None:
    if not TOKENIZER.exists():
        raise SystemExit(f"the real tokenizer is not at {TOKENIZER}: it is needed for the 92,544 vocabulary")
    work = Path(args.work)
    ckpt = work / f"internlm2-1_8b-{args.layers}l"
    t0 = time.time()
    size = build_checkpoint(ckpt, args.layers)
    print(f"checkpoint {ckpt}: {size / 1e9:.2f} GB bf16 in 2 shards, {args.layers} layers ({time.time() - t0:.0f} s)")
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    load = ("import sys, torch; from llava_min.internlm2 import InternLM2; "
            "m = InternLM2.from_pretrained(sys.argv[1], dtype=torch.bfloat16); "
            "print(sum(float(p.float().sum()) for p in m.parameters()))")
    _, load_s, load_rss = measured([py, "-c", load, str(ckpt)], cwd=ROOT, env=env)
    print(f"load + touch every weight: {load_s:.1f} s, peak RSS {load_rss / 1e9:.2f} GB "
          f"= {load_rss / size:.2f}x the checkpoint")

    data = work / "shapes"
    if not (data / "pretrain.json").exists():
        subprocess.run([py, "data/make_shapes.py", "--out", data, "--n-train", "16", "--n-test", "2",
                        "--image-size", "28"], cwd=ROOT, check=True, capture_output=True)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [py, "train.py", "--data", data / "pretrain.json", "--image-folder", data, "--tokenizer", TOKENIZER,
           "--llm", ckpt, "--vit-config", "tiny", "--image-size", "28", "--max-length", "64", "--batch-size", "1",
           "--num-workers", "0", "--max-steps", "2", "--save-every", "1", "--dtype", "bfloat16", "--out", out]
    p, train_s, train_rss = measured(list(map(str, cmd)), cwd=ROOT, env=env)
    wrote = written_bytes(out, ckpt)
    same = all(sha256(ckpt / f.name) == sha256(f) for f in (out / "llm").glob("*.safetensors"))
    print(f"stage 1, 2 steps, checkpoint at each: {train_s:.1f} s, peak RSS {train_rss / 1e9:.2f} GB "
          f"= {train_rss / size:.2f}x the checkpoint (goal <= 1.5x)")
    print(f"written in OUT: {wrote / 1e6:.1f} MB (goal <= 1000 MB); OUT/llm equals the source bit for bit: {same}")
    print("\n".join(line for line in p.stdout.splitlines() if line.startswith(("saved", "llm:", "vit:"))))


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (24 = full depth)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llava-min-scale"))
    stage1(ap.parse_args())

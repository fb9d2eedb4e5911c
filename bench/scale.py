"""Costs at real size that tiny tests cannot show.

    python bench/scale.py startup                    # 665,000 mix665k-shaped samples (a ~1 GB JSON)
    python bench/scale.py startup --samples 100000
    python bench/scale.py startup --smoke            # 2,000 samples: the code path, in seconds
    python bench/scale.py startup --several-images 0 # one image a sample (the default: 10% hold 2-6)

`startup`: writes N samples shaped like llava_v1_5_mix665k.json (short multi-turn VQA, long single-turn
descriptions, region questions with boxes, multiple choice, ~10% text-only ShareGPT conversations up to
10 turns; LLaVA's ids and image paths, some integer ids, some non-ASCII text; by default 10% of the samples
hold 2-6 images, as multi-image mixes do) and an empty file for every
image, then measures in fresh processes the wall time and peak RSS (getrusage ru_maxrss of the child) of
json.load of the file and of LLaVADataset's start-up on it (every check on: files, first answer, lengths),
with the real InternLM2 tokenizer if /work/shared/assets has it, else one trained here on the data.
Goal (issue 11): start-up at most 2x json.load's time and 1.5x its peak RSS.

    python bench/scale.py stage1                     # InternLM2-1.8B width, vocabulary and depth (3.8 GB bf16)
    python bench/scale.py stage1 --layers 4          # a shallower checkpoint: faster steps

`stage1`: builds (once, cached under --work) a random-weight checkpoint in the released format: bf16,
config.json, two shards and model.safetensors.index.json. Then, in fresh processes: loads it and touches every
weight; runs train.py stage 1 (projector only, tiny ViT at 28 px, the real tokenizer) for 2 steps with a
checkpoint at each, --dtype bfloat16. Prints peak RSS against the checkpoint's bytes, bytes written in OUT
(hard links to the source write nothing and are not counted), and whether OUT/llm is the source, bit for bit.
Goals (issue 11): peak RSS at most 1.5x the checkpoint's bytes, at most 1 GB written.

    python bench/scale.py export                     # python -m llava_min.export at the 1.8B shape
    python bench/scale.py export --layers 4

`export`: the same cached checkpoint as llm/ of a llava-min folder (a symbolic link, as
--save-frozen ref leaves it; tiny ViT, fresh projector, the real tokenizer), exported in a fresh
process: peak RSS against the largest source shard, wall time, bytes written. Then, for comparison,
the time a fresh process takes to copy the same checkpoint files (read, write, fsync): the time of
just writing the bytes.
Goals (issue 20): peak RSS at most the largest shard + 1 GB, the time that of writing the bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llava_min.tools.tokenizer_train import train  # noqa: E402  (no torch here: see measure)
REAL_TOKENIZER = ROOT.parent / "shared" / "assets" / "internlm2_tokenizer.model"
IMAGE_SIZE, MAX_LENGTH = 336, 2048   # LLaVA-1.5's ViT input and XTuner's max_length

# mix665k's parts (LLaVA-1.5 paper, Table 7), roughly: (share, turns low-high, question chars, answer chars,
# image folder or None for text-only)
KINDS = [
    ("vqa", 0.36, (1, 12), (30, 110), (1, 16), "coco/train2017"),           # VQAv2, GQA, OCR-VQA, OK-VQA
    ("conversation", 0.09, (2, 8), (30, 160), (80, 700), "coco/train2017"),  # LLaVA-Instruct conversations
    ("detail", 0.15, (1, 1), (40, 200), (300, 1800), "coco/train2017"),    # detail descriptions, reasoning
    ("choice", 0.10, (1, 1), (150, 400), (1, 3), "coco/train2017"),         # A-OKVQA multiple choice
    ("caption", 0.03, (1, 1), (40, 90), (60, 200), "textvqa/train_images"),  # TextCaps
    ("region", 0.17, (3, 15), (60, 120), (8, 70), "vg/VG_100K"),            # RefCOCO, Visual Genome boxes
    ("sharegpt", 0.10, (1, 10), (20, 2000), (60, 2500), None),             # text-only conversations
]
FOLDERS = {"coco/train2017": "{:012d}.jpg", "textvqa/train_images": "{:016x}.jpg", "vg/VG_100K": "{}.jpg",
           "gqa/images": "{}.jpg", "ocr_vqa/images": "{}.jpg", "vg/VG_100K_2": "{}.jpg"}
VQA_FOLDERS = ["coco/train2017", "gqa/images", "ocr_vqa/images"]


def make_samples(n: int, seed: int = 0, several: float = 0.0) -> list[dict]:
    """n mix665k-shaped samples; a share `several` of all of them (drawn among those with an image) holds 2-6
    images, tagged one per line at the start of the first human turn (LLaVA-OneVision's multi-image form)."""
    rng = np.random.default_rng(seed)
    image_share = sum(k[1] for k in KINDS if k[-1]) / sum(k[1] for k in KINDS)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(1, 10))) for _ in range(4000)]
    words += ["café", "naïve", "中文", "🙂", "Straße"]            # ShareGPT is not all ASCII
    corpus = " ".join(rng.choice(words, 400_000)) + " "   # texts are slices of it: fast to make
    shares = np.array([k[1] for k in KINDS])
    kinds = rng.choice(len(KINDS), n, p=shares / shares.sum())

    def text(low_high) -> str:
        length = int(np.exp(rng.uniform(np.log(low_high[0]), np.log(low_high[1] + 1))))  # log-uniform: long tail
        start = int(rng.integers(0, len(corpus) - length - 1))
        return corpus[start:start + length]

    samples = []
    for i, k in enumerate(kinds):
        name, _, turns, q_len, a_len, folder = KINDS[k]
        conversations = []
        for _ in range(int(rng.integers(turns[0], turns[1] + 1))):
            question = text(q_len)
            if name == "region":
                question += " [0.12, 0.30, 0.45, 0.81]"
            elif name == "vqa":
                question += "\nAnswer the question using a single word or phrase."
            if name == "sharegpt" and not conversations and i % 10 == 0:
                question = text((2000, 12000))  # a pasted document: the first-answer check must tokenize it
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": text(a_len)}]
        sample = {"id": f"{rng.integers(1 << 40):x}_{i % 7}"}
        if folder:
            if name == "vqa":
                folder = VQA_FOLDERS[i % 3]
            elif name == "region" and i % 5 == 0:
                folder = "vg/VG_100K_2"
            number = int(rng.integers(300_000)) if "coco" in folder else int(rng.integers(10 ** 7))
            sample = {"id": f"{number:012d}" if i % 50 else number, "image": f"{folder}/"
                      + FOLDERS[folder].format(number)}
            tag = "<image>\n" if i % 4 else "\n<image>"           # LLaVA's data has both places
            first = conversations[0]
            first["value"] = tag + first["value"] if tag[0] == "<" else first["value"] + tag
            if several and rng.random() < several / image_share:
                count = int(rng.integers(2, 7))
                names = [sample["image"]] + [f"{folder}/" + FOLDERS[folder].format(int(rng.integers(10 ** 7)))
                                             for _ in range(count - 1)]
                sample["image"] = names
                first["value"] = "".join(f"Image {k + 1}: <image>\n" for k in range(count)) \
                    + first["value"].replace("<image>", "").strip()
        sample["conversations"] = conversations
        samples.append(sample)
    return samples


def write_data(folder: pathlib.Path, n: int, tokenizer: pathlib.Path, several: float = 0.0) -> None:
    """The JSON file (one sample per line inside the list, ASCII with escapes as json.dump writes), the
    empty image files it names, and a tokenizer trained on it if `tokenizer` does not exist."""
    samples = make_samples(n, several=several)
    path = folder / "mix.json"
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(map(json.dumps, samples)) + "\n]\n")
    names = set()
    for sample in samples:
        image = sample.get("image", [])
        names.update([image] if isinstance(image, str) else image)
    for image in sorted(names):
        file = folder / "images" / image
        file.parent.mkdir(parents=True, exist_ok=True)
        file.touch()
    if not tokenizer.exists():  # a fresh clone: a small one trained on the same data
        train([path], vocab_size=1000, out=tokenizer)


CHILD = {  # each runs in a fresh interpreter and prints {"seconds", "max_rss", "imported_rss"} as JSON
    "json.load": "import json; t = time.perf_counter(); data = json.load(open(file)); t = time.perf_counter() - t",
    "LLaVADataset": "from llava_min.data import LLaVADataset; from llava_min.dinov2 import PRESETS; r0 = rss(); "
                    f"n = PRESETS['dinov2-large'].image_tokens({IMAGE_SIZE}); t = time.perf_counter(); "
                    f"ds = LLaVADataset(file, tok, folder, image_size={IMAGE_SIZE}, max_length={MAX_LENGTH}, "
                    "image_tokens=n); t = time.perf_counter() - t; print(ds.report().splitlines()[0], file=sys.stderr)",
}


def measure(what: str, file, tokenizer, folder) -> dict:
    # A fresh interpreter. Linux starts a child's ru_maxrss at its parent's RSS: hence a parent without torch.
    code = ("import json, resource, sys, time\n"
            "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            f"file, tok, folder = {str(file)!r}, {str(tokenizer)!r}, {str(folder)!r}\n"
            "r0 = rss()\n" + CHILD[what] + "\n"
            "print(json.dumps({'seconds': t, 'max_rss': rss(), 'imported_rss': r0}))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{what} failed:\n{run.stderr[-3000:]}")
    if run.stderr.strip():
        print(f"  {what}: {run.stderr.strip()}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def startup(args) -> None:
    n = 2000 if args.smoke else args.samples
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        path, tokenizer = tmp / "mix.json", REAL_TOKENIZER if REAL_TOKENIZER.exists() else tmp / "tok.model"
        # In a child process: Linux starts a child's ru_maxrss at its parent's RSS, so the parent stays small.
        writer = multiprocessing.get_context("fork").Process(target=write_data,
                                                             args=(tmp, n, tokenizer, args.several_images))
        writer.start()
        writer.join()
        if writer.exitcode:
            raise SystemExit(f"writing the data failed (exit code {writer.exitcode})")
        print(f"{n} mix665k-shaped samples ({args.several_images:.0%} with 2-6 images), "
              f"{path.stat().st_size / 2**20:.0f} MiB of JSON; tokenizer {tokenizer}; "
              f"image size {IMAGE_SIZE}, max_length {MAX_LENGTH}; best of {args.repeats}")
        results = {}
        for _ in range(args.repeats):   # alternating, so that both see the same machine
            for what in CHILD:
                r = measure(what, path, tokenizer, tmp / "images")
                best = results.setdefault(what, r)
                results[what] = {k: min(best[k], r[k]) for k in r}
        for what, r in results.items():
            print(f"{what:>13}: {r['seconds']:7.2f} s, peak RSS {r['max_rss'] / 2**30:6.2f} GiB "
                  f"({r['imported_rss'] / 2**30:.2f} GiB after imports)")
        ours, peer = results["LLaVADataset"], results["json.load"]
        print(f"LLaVADataset / json.load: time {ours['seconds'] / peer['seconds']:.2f}x (goal <= 2), "
              f"peak RSS {ours['max_rss'] / peer['max_rss']:.2f}x (goal <= 1.5)")


def build_checkpoint(folder: Path, layers: int) -> int:
    """Random bf16 weights of internlm2-1_8b's shape (first `layers` layers), two shards; returns its bytes."""
    import torch   # here, not at the top: `startup` measures children that must not pay for torch
    from safetensors.torch import save_file

    from llava_min.internlm2 import PRESETS, InternLM2
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
    if not REAL_TOKENIZER.exists():
        raise SystemExit(f"the real tokenizer is not at {REAL_TOKENIZER}: it is needed for the 92,544 vocabulary")
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
    cmd = [py, "train.py", "--data", data / "pretrain.json", "--image-folder", data, "--tokenizer", REAL_TOKENIZER,
           "--llm", ckpt, "--vit-config", "tiny", "--image-size", "28", "--max-length", "64", "--batch-size", "1",
           "--num-workers", "0", "--max-steps", "2", "--save-every", "1", "--dtype", "bfloat16", "--out", out]
    p, train_s, train_rss = measured(list(map(str, cmd)), cwd=ROOT, env=env)
    wrote = written_bytes(out, ckpt)
    same = all(sha256(ckpt / f.name) == sha256(f) for f in (out / "llm").glob("*.safetensors"))
    print(f"stage 1, 2 steps, checkpoint at each: {train_s:.1f} s, peak RSS {train_rss / 1e9:.2f} GB "
          f"= {train_rss / size:.2f}x the checkpoint (goal <= 1.5x)")
    print(f"written in OUT: {wrote / 1e6:.1f} MB (goal <= 1000 MB); OUT/llm equals the source bit for bit: {same}")
    print("\n".join(line for line in p.stdout.splitlines() if line.startswith(("saved", "llm:", "vit:"))))


def llava_folder(folder: Path, llm: Path) -> None:
    """A llava-min model folder around the checkpoint `llm`: tiny DINOv2, fresh projector, the real
    tokenizer."""
    import torch

    from llava_min.dinov2 import DINOv2
    from llava_min.dinov2 import PRESETS as VIT_PRESETS
    from llava_min.projector import Projector
    from llava_min.weights import write_json

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "llm").symlink_to(llm.resolve())
    torch.manual_seed(0)
    vit = DINOv2(VIT_PRESETS["tiny"])
    vit.save_pretrained(folder / "vit")
    llm_width = json.loads((llm / "config.json").read_text())["hidden_size"]
    Projector(vit.config.hidden_size, llm_width).save_pretrained(folder / "projector")
    shutil.copy(REAL_TOKENIZER, folder / "tokenizer.model")
    write_json({"select_layer": -2, "image_size": 28, "image_mode": "pad", "stop_ids": [92542, 2],
                "text_vocab_size": 92544}, folder / "llava_config.json")


# A fresh interpreter that copies the files argv[2:] into the folder argv[1], each synced to disk.
_COPY = ("import os, shutil, sys; from pathlib import Path\n"
         "for f in sys.argv[2:]:\n"
         "    out = Path(sys.argv[1]) / Path(f).name\n"
         "    shutil.copyfile(f, out)\n"
         "    fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)\n")


def export(args) -> None:
    if not REAL_TOKENIZER.exists():
        raise SystemExit(f"the real tokenizer is not at {REAL_TOKENIZER}: it is needed for the "
                         "92,544 vocabulary")
    work = Path(args.work)
    ckpt = work / f"internlm2-1_8b-{args.layers}l"
    size = build_checkpoint(ckpt, args.layers)
    shards = sorted(ckpt.glob("*.safetensors"))
    largest = max(f.stat().st_size for f in shards)
    print(f"checkpoint {ckpt}: {size / 1e9:.2f} GB bf16, largest shard {largest / 1e9:.2f} GB")
    model = work / "llava"
    llava_folder(model, ckpt)
    out = work / "llava-hf"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "llava_min.export", "--model", model, "--out", out]
    p, export_s, export_rss = measured(cmd, cwd=ROOT, env=env)
    wrote = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(p.stdout.strip())
    goal = (largest + 1e9) / 1e9
    print(f"export: {export_s:.1f} s, peak RSS {export_rss / 1e9:.2f} GB (goal <= largest shard "
          f"+ 1 GB = {goal:.2f} GB), {wrote / 1e9:.2f} GB written")

    copy = work / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    _, copy_s, copy_rss = measured([sys.executable, "-c", _COPY, copy, *shards], cwd=ROOT, env=env)
    copied = sum(f.stat().st_size for f in copy.iterdir())
    shutil.rmtree(copy)
    print(f"copying the checkpoint's files ({copied / 1e9:.2f} GB): {copy_s:.1f} s, peak RSS "
          f"{copy_rss / 1e9:.2f} GB")
    print(f"export / copy: time {export_s / copy_s:.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("startup", help="LLaVADataset start-up against json.load of the same file")
    s.add_argument("--samples", type=int, default=665_000)
    s.add_argument("--smoke", action="store_true", help="2,000 samples: checks the code path, measures nothing")
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument("--several-images", type=float, default=0.1, metavar="SHARE",
                   help="share of all samples holding 2-6 images (default 0.1; 0: one image a sample, as mix665k)")
    s = sub.add_parser("stage1", help="stage 1 at InternLM2-1.8B width: peak RSS, bytes written, load time")
    s.add_argument("--layers", type=int, default=24, help="decoder layers (24 = full depth)")
    s.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llava-min-scale"))
    s = sub.add_parser("export", help="python -m llava_min.export at InternLM2-1.8B size: RSS, "
                                      "time, bytes")
    s.add_argument("--layers", type=int, default=24, help="decoder layers (24 = full depth)")
    s.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llava-min-scale"))
    args = parser.parse_args(argv)
    {"startup": startup, "stage1": stage1, "export": export}[args.part](args)


if __name__ == "__main__":
    main()

"""Loader throughput: samples/s with 0, 1, 2 workers, against torch.utils.data.DataLoader on the same batches.

    python bench/loader.py                      # shapes set, 1024 images, 336 px ViT input, batch 16
    python bench/loader.py --workers 0 2 4 --samples 4096 --image-size 224

The data: data/make_shapes.py renders the shapes set into a temporary folder and LLaVADataset + collate
turn it into batches (tokenize, decode the PNG, pad to square, resize, normalise, pad the batch): the real
per-sample work of a training run. Without those files, a stand-in data set decodes random-noise PNGs
written here. The batches come from GlobalBatchSampler; both loaders get the same list of batches.

Each configuration is timed from the start of the iteration (worker start-up included, as a training run
pays it) to the last batch; ours and torch's alternate, best of --repeats each. Printed: samples/s, our
speed-up over our own 0-worker rate, our rate over torch's with the same number of workers, and the CPU
time per sample of the main process and its workers together (what moving batches between processes costs,
and a figure that other processes on a busy machine disturb less than the rates).
Goal: 2 workers >= 1.7x the 0-worker rate, and not slower than torch's DataLoader.
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llava_min.data import LLaVADataset, collate  # noqa: E402
from llava_min.dinov2 import PRESETS  # noqa: E402
from llava_min.loader import Loader  # noqa: E402
from llava_min.sampler import GlobalBatchSampler  # noqa: E402
from llava_min.tools.tokenizer_train import train  # noqa: E402

REAL_TOKENIZER = ROOT.parent / "shared" / "assets" / "internlm2_tokenizer.model"


def shapes_data(folder: pathlib.Path, n: int, image_size: int):
    """(dataset, collate, description) from the shapes set through LLaVADataset, or None if unavailable."""
    script = ROOT / "data" / "make_shapes.py"
    if not script.exists():
        return None
    subprocess.run([sys.executable, str(script), "--out", str(folder), "--n-train", str(n), "--n-test", "1",
                    "--image-size", "224"], check=True, stdout=subprocess.DEVNULL)
    tokenizer = REAL_TOKENIZER
    if not tokenizer.exists():  # a fresh clone: train a small one on the same data
        tokenizer = folder / "tokenizer.model"
        train([folder / "finetune.json"], vocab_size=500, out=tokenizer)
    patches = PRESETS["dinov2-large"].image_tokens(image_size)  # LLM positions per image
    dataset = LLaVADataset(folder / "finetune.json", str(tokenizer), folder, image_size=image_size,
                           image_tokens=patches, max_length=2048 + patches)
    return dataset, collate, f"shapes set ({len(dataset)} samples) through LLaVADataset + collate"


class NoisePNGs:
    """Stand-in data set: decode a random-noise PNG (incompressible, so decoding costs what a photo's
    does), resize, normalise; a random-length token row."""

    def __init__(self, folder: pathlib.Path, n: int, image_size: int):
        rng = np.random.default_rng(0)
        self.paths, self.image_size = [], image_size
        for i in range(n):
            path = folder / f"{i:06d}.png"
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(path)
            self.paths.append(path)
        self.lengths = [int(k) for k in rng.integers(32, 512, n)]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - 0.45) / 0.25      # (S, S, 3)
        return {"pixel_values": torch.from_numpy(pixels.transpose(2, 0, 1).copy()),
                "input_ids": torch.randint(0, 1000, (self.lengths[i],))}


def noise_collate(samples):
    ids = torch.nn.utils.rnn.pad_sequence([s["input_ids"] for s in samples], batch_first=True)
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]), "input_ids": ids}


def one_pass(make_iterable) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its workers) of one full pass, start-up included."""
    def cpu():
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime  # children: joined workers

    start, start_cpu = time.perf_counter(), cpu()
    for _ in make_iterable():
        pass
    return time.perf_counter() - start, cpu() - start_cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1024, help="images to render (default: 1024)")
    parser.add_argument("--image-size", type=int, default=336, help="ViT input side (default: 336)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the main process, as in a training run's data path; workers set 1 too

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        data = shapes_data(folder, args.samples, args.image_size)
        if data is None:
            dataset = NoisePNGs(folder, args.samples, args.image_size)
            data = dataset, noise_collate, f"stand-in noise PNGs ({len(dataset)} samples)"
        dataset, collate, what = data
        sampler = GlobalBatchSampler(dataset.lengths, args.batch_size)
        batches = list(sampler.batches_for_rank(stop_step=sampler.steps_per_epoch))
        n = sum(len(b) for b in batches)
        load = os.getloadavg()[0]
        print(f"{what}; {len(batches)} batches of {args.batch_size}, {args.image_size} px; "
              f"{os.cpu_count()} CPUs; best of {args.repeats}")
        print(f"{'workers':>7} {'ours samples/s':>15} {'torch samples/s':>16} {'ours / ours@0':>14} "
              f"{'ours / torch':>13} {'CPU ms/sample ours, torch':>26}")
        base = None
        for workers in args.workers:
            # With workers, the batch is built straight into shared memory (as train.py does), for both.
            coll = functools.partial(collate, shared=True) if workers and collate is not noise_collate else collate
            ours = functools.partial(Loader, dataset, batches, coll, num_workers=workers, prefetch=args.prefetch)
            peer = functools.partial(torch.utils.data.DataLoader, dataset, batch_sampler=batches, collate_fn=coll,
                                     num_workers=workers, prefetch_factor=args.prefetch if workers else None)
            # Alternate the two, so that both see the same load from other processes; keep the best pass.
            runs = [(one_pass(ours), one_pass(peer)) for _ in range(args.repeats)]
            (ours_s, ours_cpu), (peer_s, peer_cpu) = [min(r[k] for r in runs) for k in (0, 1)]
            ours_rate, peer_rate = n / ours_s, n / peer_s
            base = base or (ours_rate if workers == 0 else None)
            speedup = f"{ours_rate / base:.2f}x" if base else "-"
            print(f"{workers:>7} {ours_rate:>15.1f} {peer_rate:>16.1f} {speedup:>14} {ours_rate / peer_rate:>12.2f}x "
                  f"{1e3 * ours_cpu / n:>18.1f}, {1e3 * peer_cpu / n:.1f}", flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} at the end (it was {load:.1f} at the start): other processes "
              f"on the {os.cpu_count()} CPUs make the ratios less reliable the higher it is; CPU time per sample "
              f"(main process + workers) is less sensitive to them")


if __name__ == "__main__":
    main()

"""A stage-2 pass over the same samples, packed (--pack) against padded length-grouped batches, in one process.

    python bench/packing.py                 # 64 samples, 1 thread, 3 interleaved passes of each
    python bench/packing.py --smoke         # the same code path in seconds (tests/test_bench_smoke.py)

The length mix: bench/scale.py's llava_v1_5_mix665k-shaped samples (VQA 36%, region 17%, detail 15%, choice
10%, text-only ShareGPT 10%, conversation 9%, caption 3%; 90% with one image), their estimated LLM lengths
at 576 image tokens capped at 2048, all divided by SCALE = 4 so that a CPU step takes seconds: 144 image tokens
(a 168 px image in 14 px patches), text from 1 to 512 positions. Each sample is random ids of that length,
the second half of its text supervised. Model: InternLM2 4 layers x 512 (8 heads over 2 KV heads), a frozen
DINOv2 2 x 64, projector and LLM trained (finetune.py's default parts), fp32.

Padded, as finetune.py --batch-size 8 runs in one process: GlobalBatchSampler's length grouping (modalities
apart, each batch sorted) with the micro-batch = the global batch of 8; and a global batch of 32 cut into 4
length-sorted micro-batches of 8 (what 4 processes or --grad-accum 4 see). Packed: --pack 2048 with one row a
micro-batch (--batch-size 1: a single row is never padded), and --pack 1024 with 2 rows (padded to the longer
row); both hold about the positions of 8 padded rows. Each runs forward and backward over every sample once,
interleaved with the others, fastest of --repeats; tokens/s counts real (non-padding) LLM positions per second of
this process's CPU time (and, beside it, of wall time, which a shared machine's other jobs also fill).
Goal (issue 13): packed >= 1.15x the padded length-grouped tokens/s on a CPU. On a CPU the cost of a position
hardly depends on its batch, so the gain is close to the positions not computed:
(1 - padding of packed) / (1 - padding of padded), printed beside it.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale import MAX_LENGTH, make_samples  # noqa: E402
from llava_min import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava_min.data import collate, collate_packed, estimate_length  # noqa: E402
from llava_min.dinov2 import DINOv2, DINOv2Config  # noqa: E402
from llava_min.internlm2 import InternLM2, InternLM2Config  # noqa: E402
from llava_min.llava import LLaVA  # noqa: E402
from llava_min.projector import Projector  # noqa: E402
from llava_min.sampler import GlobalBatchSampler  # noqa: E402

SCALE = 4
IMAGE_TOKENS, PATCH = 576 // SCALE, 14
IMAGE_SIZE = int(IMAGE_TOKENS ** 0.5) * PATCH


def mix_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Signed LLM lengths (< 0 text-only) of n mix665k-shaped samples, scaled down by SCALE."""
    full = np.array([estimate_length(s, 576) for s in make_samples(n, seed)])
    return np.sign(full) * np.maximum(np.minimum(np.abs(full), MAX_LENGTH) // SCALE, 8)


def items(lengths: np.ndarray, vocab: int, seed: int = 0) -> list[dict]:
    """LLaVADataset-like items of exactly these LLM lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths.tolist()):
        image = n > 0
        n_ids = abs(n) - (IMAGE_TOKENS - 1 if image else 0)   # one placeholder stands for the image's positions
        ids = torch.randint(3, vocab, (max(n_ids, 4),), generator=g)
        labels = ids.clone()
        labels[: len(ids) // 2] = IGNORE_INDEX
        if image:
            ids[1], labels[1] = IMAGE_TOKEN_INDEX, IGNORE_INDEX
        px = torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g) if image else None
        out.append({"index": i, "id": str(i), "input_ids": ids, "labels": labels, "pixel_values": px})
    return out


def build_model(layers: int, width: int) -> LLaVA:
    torch.manual_seed(0)
    llm = InternLM2(InternLM2Config(vocab_size=8192, hidden_size=width, intermediate_size=width * 11 // 4,
                                    num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2))
    vit = DINOv2(DINOv2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE))
    model = LLaVA(llm, vit, Projector(64, width)).train()
    model.requires_grad_(False)
    model.llm.requires_grad_(True)
    model.projector.requires_grad_(True)
    return model


def run_pass(model, batches: list[dict]) -> tuple[float, float, int, int]:
    """Forward + backward over every micro-batch: (CPU seconds, wall seconds, real positions, all positions).
    CPU seconds of this process: on a machine shared with other jobs, the wall clock measures them too."""
    real = total = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for b in batches:
        out = model(b["input_ids"], b["pixel_values"], labels=b["labels"], attention_mask=b["attention_mask"])
        out.loss_sum.backward()
        real += int((out.attention_mask > 0).sum())
        total += out.attention_mask.numel()
    model.zero_grad(set_to_none=True)
    return time.process_time() - c0, time.perf_counter() - t0, real, total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="passes of each; the fastest counts")
    p.add_argument("--threads", type=int, default=1, help="1: CPU time then measures this job alone")
    p.add_argument("--smoke", action="store_true", help="32 samples, a 2-layer 128-wide LLM, one pass")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, layers, width = (32, 2, 128) if args.smoke else (args.samples, 4, 512)
    repeats = 1 if args.smoke else args.repeats
    pack = MAX_LENGTH // SCALE
    lengths = mix_lengths(n)
    data = items(lengths, 8192)
    model = build_model(layers, width)
    a = np.abs(lengths)
    print(f"packing bench | {n} samples, LLM positions mean {a.mean():.0f}, median {np.median(a):.0f}, "
          f"max {a.max()}, {np.mean(lengths > 0):.0%} with an image of {IMAGE_TOKENS} tokens | LLM {layers} x "
          f"{width}, frozen ViT | {args.threads} threads")

    one = GlobalBatchSampler(lengths, 8, seed=0)
    four = GlobalBatchSampler(lengths, 32, seed=0)
    two_rows = GlobalBatchSampler(lengths, 2, seed=0, pack=2 * pack)
    one_row = GlobalBatchSampler(lengths, 1, seed=0, pack=4 * pack)
    runs = {
        "padded (1 process, batch 8)": [collate([data[i] for i in one.global_batch(s)])
                                        for s in range(one.steps_per_epoch)],
        "padded (grouped over 4 x 8)": [collate([data[i] for i in four.local_batch(s, 0, 1, m, 4)])
                                        for s in range(four.steps_per_epoch) for m in range(4)],
        f"packed (--pack {4 * pack}, 1 row)": [collate_packed([data[i] for i in one_row.global_batch(s)], 4 * pack,
                                                              IMAGE_TOKENS) for s in range(one_row.steps_per_epoch)],
        f"packed (--pack {2 * pack}, 2 rows)": [collate_packed([data[i] for i in two_rows.global_batch(s)],
                                                               2 * pack, IMAGE_TOKENS)
                                                for s in range(two_rows.steps_per_epoch)],
    }
    times = {name: [] for name in runs}
    for _ in range(repeats):                        # interleaved: a busy machine slows all of them alike
        for name, batches in runs.items():
            times[name].append(run_pass(model, batches))
    speed, padding = {}, {}
    for name, batches in runs.items():
        cpu, wall, real, total = min(times[name])
        speed[name], padding[name] = (real / cpu, real / min(t[1] for t in times[name])), 1 - real / total
        rows = sum(b["input_ids"].shape[0] for b in batches)
        print(f"  {name:30s} {len(batches):3d} micro-batches, {rows:3d} rows, {real} real positions, padding "
              f"{1 - real / total:6.1%}: {speed[name][0]:6.0f} tokens/s of CPU time ({cpu:.1f} s), "
              f"{speed[name][1]:6.0f} of wall time")
    one, four, *packs = runs
    for packed in packs:
        for padded in (one, four):
            print(f"  tokens/s packed / padded, {packed} / {padded}: {speed[packed][0] / speed[padded][0]:.2f}x "
                  f"CPU time, {speed[packed][1] / speed[padded][1]:.2f}x wall; positions not computed alone: "
                  f"{(1 - padding[packed]) / (1 - padding[padded]):.2f}x (goal >= 1.15x)")


if __name__ == "__main__":
    main()

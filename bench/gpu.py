"""Training throughput on one GPU at the released shapes: tokens/s, MFU and peak memory against the estimate.

    python bench/gpu.py                               # InternLM2-1.8B shape + DINOv2-large at 336 px, batch 4
    python bench/gpu.py --batch-size 8 --steps 20
    python bench/gpu.py --smoke                       # a seconds-long dry run of the same code on CPU
    torchrun --nproc_per_node 8 bench/gpu.py --llm-config internlm2-7b --fsdp   # sharded (train.py --fsdp)
    python bench/gpu.py --pack 8192 --seq-len 1024 --batch-size 1   # packed rows: 8 samples each, varlen_attn

Random weights (nothing to download), the stage-2 setting of finetune.py: the ViT frozen and stored in bf16,
the projector and the LLM trained with fp32 master weights under bf16 autocast, per-block gradient
checkpointing, fused AdamW. Each row holds one image (576 patch tokens at 336 px) and text up to
--seq-len LLM positions; labels are -100 on the image and the prompt (the first half of the text).

Printed after --warmup untimed steps and --steps timed ones:
  * tokens/s: LLM positions (image tokens included) per second;
  * MFU: model FLOPs per second / the card's peak dense bf16 FLOPs (--peak-tflops, or looked up by name).
    Model FLOPs per step = 6 x (LLM matmul parameters) x positions   (forward 2, backward 4)
                         + 6 x hidden x vocab x supervised positions  (the output head sees only those)
                         + 6 x layers x B x T^2 x hidden / 2 x 2      (causal attention: QK^T and AV, half the square)
                         + 2 x (ViT block parameters) x ViT tokens + ViT attention   (forward only: frozen)
                         + the projector's forward and backward.
    Checkpointing's recomputation is extra work, not counted (the HFU line counts it);
  * peak memory: torch.cuda.max_memory_allocated over the timed steps, next to what
    `python -m llava_min.memory` estimates for the same flags, when that module is present.
--fsdp shards the model as train.py --fsdp does (llava_min/fsdp.py: bf16 all-gathers, fp32 reduce-scatters and
master weights), over torchrun's ranks or, started without torchrun, over a 1-process group; the numbers are
per GPU, every rank stepping on the same batch. Finishes in well under 5 minutes on an H100 (start-up included).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llava_min import IGNORE_INDEX, IMAGE_TOKEN_INDEX, dist, fsdp  # noqa: E402
from llava_min.dinov2 import DINOv2, load_config as vit_config  # noqa: E402
from llava_min.internlm2 import InternLM2, load_config as llm_config  # noqa: E402
from llava_min.llava import LLaVA, LLaVAConfig  # noqa: E402
from llava_min.projector import Projector  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 756.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}


def build(args, device):
    """LLaVA with random weights: LLM and projector fp32 (master weights), ViT bf16 and frozen."""
    llm_cfg, vit_cfg = llm_config(args.llm_config), vit_config(args.vit_config)
    with torch.device(device):
        llm = InternLM2(llm_cfg)
        vit = DINOv2(vit_cfg).to(torch.bfloat16)
        projector = Projector(vit_cfg.hidden_size, llm_cfg.hidden_size)
    model = LLaVA(llm, vit, projector, LLaVAConfig(image_size=args.image_size))
    model.vit.requires_grad_(False)
    model.train()
    model.set_gradient_checkpointing(not args.no_checkpointing)
    return model


def batch(args, model, device):
    """B rows of one image + text, seq_len LLM positions each; labels on the second half of the text. With
    --pack N: B rows of N // seq_len such samples each, laid end to end (attention_mask k on the k-th)."""
    n_patches = model.vit.config.image_tokens(args.image_size)
    text = args.seq_len - n_patches + 1                  # the placeholder itself becomes the n_patches vectors
    if text < 4:
        raise ValueError(f"--seq-len {args.seq_len} leaves no room for text after {n_patches} image tokens")
    g = torch.Generator().manual_seed(0)
    vocab = model.llm.config.vocab_size
    per_row = args.pack // args.seq_len if args.pack else 1
    ids = torch.randint(3, vocab, (args.batch_size * per_row, text), generator=g)
    ids[:, 0], ids[:, 1] = 1, IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :text // 2] = IGNORE_INDEX
    pixels = torch.randn(ids.shape[0], 3, args.image_size, args.image_size, generator=g)
    mask = torch.arange(1, per_row + 1).repeat_interleave(text).repeat(args.batch_size, 1)   # (B, per_row * text)
    rows = (args.batch_size, per_row * text)
    return ids.view(rows).to(device), pixels.to(device), labels.view(rows).to(device), mask.to(device)


def model_flops(model, ids, labels, n_patches) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs incl. checkpointing's recomputation) of one step; see the docstring."""
    c, v = model.llm.config, model.vit.config
    B = int((ids == IMAGE_TOKEN_INDEX).sum())             # samples: one image each (several per packed row)
    T = (ids.numel() + B * (n_patches - 1)) // B          # LLM positions per sample
    supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
    layer_params = sum(p.numel() for n, p in model.llm.model.layers.named_parameters() if p.dim() == 2)
    llm_fwd = 2 * layer_params * B * T + 2 * B * T * T * c.hidden_size * c.num_hidden_layers   # causal: half of 4BT^2H
    head_fwd = 2 * c.hidden_size * c.vocab_size * supervised
    vit_blocks = model.config.select_layer % (v.num_hidden_layers + 1)        # features() runs only these
    vit_tokens = n_patches + model.vit.num_prefix_tokens
    block_params = sum(p.numel() for p in model.vit.encoder.layer[0].parameters() if p.dim() == 2)
    vit_fwd = vit_blocks * B * (2 * block_params * vit_tokens + 4 * vit_tokens ** 2 * v.hidden_size)
    proj_fwd = 2 * sum(p.numel() for p in model.projector.parameters() if p.dim() == 2) * B * n_patches
    useful = 3 * (llm_fwd + head_fwd + proj_fwd) + vit_fwd
    recompute = llm_fwd if model.llm.gradient_checkpointing else 0
    return float(useful), float(useful + recompute)


def peak_tflops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def estimate(args) -> tuple[dict | None, str]:
    """(the "estimate" object of `python -m llava_min.memory --json` for this run, the command), or (None, why)."""
    if not (ROOT / "llava_min" / "memory.py").exists():
        return None, "llava_min/memory.py is not in this checkout"
    flags = ["--llm-config", args.llm_config, "--vit-config", args.vit_config, "--image-size", str(args.image_size),
             "--batch-size", str(args.batch_size), "--max-length", str(args.seq_len), "--train", "projector,llm",
             "--dtype", "bfloat16"] + ([] if args.no_checkpointing else ["--grad-checkpointing"]) \
        + (["--fsdp", "--world-size", str(args.world_size)] if args.fsdp else []) \
        + (["--pack", str(args.pack), "--max-length", str(args.seq_len)] if args.pack else [])
    command = "python -m llava_min.memory " + " ".join(flags)
    try:
        out = subprocess.run([sys.executable, "-m", "llava_min.memory", *flags, "--json"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout)["estimate"], command
    except subprocess.TimeoutExpired:
        return None, f"{command} did not answer in 120 s"
    except (json.JSONDecodeError, KeyError, TypeError):
        return None, f"{command} failed: {(out.stderr.strip().splitlines() or [out.stdout[-200:]])[-1]}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-config", default="internlm2-1_8b")
    parser.add_argument("--vit-config", default="dinov2-large")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048, help="LLM positions per row, image tokens included")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--pack", type=int, default=0, help="pack rows of this many positions (>= --seq-len)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2, as train.py --fsdp")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny presets, 56 px, batch 2 x 96 positions, 2 + 2 steps; runs on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.llm_config, args.vit_config, args.image_size = "tiny", "tiny", 56
        args.batch_size, args.seq_len, args.warmup, args.steps = 2, 96, 2, 2
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(2)
    else:
        raise SystemExit("bench/gpu.py needs a CUDA device (use --smoke for a CPU dry run)")
    t_start = time.perf_counter()
    d, args.world_size = None, 1
    if args.fsdp:
        if "RANK" not in os.environ:     # no torchrun: a process group of one, so that the sharded code runs
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        d = dist.setup(timeout_s=600)
        device, args.world_size = d.device, d.world_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if d is None or d.rank == 0:
        print(f"gpu bench | {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        sys.stdout = open(os.devnull, "w")          # one report, rank 0's

    torch.manual_seed(0)
    model = build(args, device)
    if d is not None:
        fsdp.shard(model, d, torch.bfloat16)
    ids, pixels, labels, mask = batch(args, model, device)
    n_patches = model.vit.config.image_tokens(args.image_size)
    positions = ids.numel() + pixels.shape[0] * (n_patches - 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    print(f"  {args.llm_config} + {args.vit_config} at {args.image_size} px: batch {args.batch_size} x "
          f"{positions // args.batch_size} positions ({pixels.shape[0] // args.batch_size} samples of "
          f"{n_patches} image tokens + text each), bf16 autocast, "
          f"checkpointing {'off' if args.no_checkpointing else 'on'}, "
          f"{f'FSDP over {args.world_size} rank(s), ' if args.fsdp else ''}"
          f"{sum(p.numel() for p in trainable) / 1e9:.3f}B trained parameters")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids, pixels, labels=labels, attention_mask=mask).loss   # as train.py calls it
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        loss = step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise SystemExit(f"loss is {loss.item()}: the run is broken, the numbers below would mean nothing")

    step_time = sorted(times)[len(times) // 2]
    useful, hardware = model_flops(model, ids, labels, n_patches)
    print(f"  step {step_time * 1e3:.1f} ms (median of {len(times)}; min {min(times) * 1e3:.1f}), "
          f"loss {loss.item():.3f}")
    print(f"  tokens/s {positions / step_time:,.0f}")
    peak = peak_tflops(args, device)
    if peak:
        print(f"  MFU {useful / step_time / (peak * 1e12):.1%}  (HFU {hardware / step_time / (peak * 1e12):.1%}; "
              f"{useful / 1e12:.1f} model TFLOP per step, peak {peak:.0f} TFLOP/s)")
    else:
        print(f"  MFU: peak unknown for {name}; {useful / step_time / 1e12:.2f} model TFLOP/s "
              "(pass --peak-tflops)")
    GiB = 2 ** 30
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if measured is not None:
        print(f"  peak memory {measured / GiB:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / GiB:.2f} GiB reserved")
    est, command = estimate(args)
    if est is None:
        print(f"  memory estimate: none ({command})")
    else:
        # max_memory_allocated does not see the CUDA context, which the estimate books separately.
        tensors = est["total"] - est.get("cuda_context", 0)
        line = f"  memory estimate: {est['total'] / GiB:.2f} GiB, {tensors / GiB:.2f} GiB without the CUDA context"
        if measured is not None:
            line += f"; measured / estimated tensors = {measured / tensors:.3f}"
        print(f"{line}  ({command})")
    print(f"  total {time.perf_counter() - t_start:.0f} s")
    if d is not None:
        dist.teardown(d)


if __name__ == "__main__":
    main()

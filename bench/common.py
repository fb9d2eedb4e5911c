"""What the side-by-side benchmarks share: the machine line, the model pair, the batch, interleaved timing.

The model pair: one random checkpoint written in the official formats (InternLM2 with fused wqkv, DINOv2 hub
names, XTuner projector) by the same writers the parity tests use (tests/_ckpt_*.py), loaded by
`LLaVA.from_pretrained`, and transformers' `LlavaForConditionalGeneration` holding the same tensors, with
its fastest stock attention (SDPA) on both towers. The bench shape (issue 6):

    LLM     6 layers x 512, 8 heads over 2 KV heads (GQA 4:1), SwiGLU 1408, 8K vocabulary
    ViT     DINOv2 6 layers x 384 (6 heads), 224 px input: 16 x 16 = 256 image tokens
    batch   2 rows, each 128 text tokens and one image: 383 LLM positions
"""
from __future__ import annotations

import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))   # the official-format checkpoint writers and the transformers mapping

from _ckpt_llava import expand_image_tokens, write_tiny_llava  # noqa: E402
from llava_min import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava_min.internlm2 import InternLM2Config  # noqa: E402
from llava_min.llava import LLaVA  # noqa: E402

# `--smoke` on any bench's command line (read here: the shapes are module constants its imports see) swaps in
# a tiny pair: the same code paths in seconds, for tests/test_bench_smoke.py. Its numbers measure nothing.
SMOKE = "--smoke" in sys.argv
LLM_CONFIG = InternLM2Config(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                             num_attention_heads=8, num_key_value_heads=2,
                             rope_scaling={"type": "dynamic", "factor": 2.0})   # as the released configs
VIT = dict(hidden=384, layers=6, heads=6, image_size=224, patch_size=14)
IMAGE_SIZE, TEXT_TOKENS, PROMPT_TOKENS = 224, 128, 64
if SMOKE:
    LLM_CONFIG = InternLM2Config(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    VIT = dict(hidden=64, layers=2, heads=2, image_size=56, patch_size=14)
    IMAGE_SIZE, TEXT_TOKENS, PROMPT_TOKENS = 56, 32, 16
N_PATCHES = (IMAGE_SIZE // 14) ** 2
IMAGE_TOKEN_ID = LLM_CONFIG.vocab_size - 1   # transformers' placeholder id; batches below never use it
THREADS = 2


def setup_threads(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)


def machine() -> str:
    """One line: CPU model, threads used / cores, torch and transformers versions."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads of {os.cpu_count()} cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}, {load()}")


def load() -> str:
    """The 1-minute load average, with a warning when other processes compete for the cores this bench uses:
    each of its threads then waits for the others at every parallel op, and wall times swell many-fold."""
    if not hasattr(os, "getloadavg"):
        return "load average unknown"
    busy = os.getloadavg()[0]
    note = ""
    if busy > 1.5 and torch.get_num_threads() > 1:
        note = " (busy machine: trust the minima, or rerun with --threads 1)"
    return f"load average {busy:.1f}{note}"


def load_pair(train: bool = False, seed: int = 0):
    """(llava-min LLaVA, transformers LlavaForConditionalGeneration) on the same random weights, fp32.

    train=False: both in eval mode. train=True: both in training mode with the ViT frozen, the stage-2 setting
    of finetune.py (projector and LLM trained).
    """
    from transformers.utils import logging

    logging.disable_progress_bar()            # save_pretrained's shard-writing bar
    with tempfile.TemporaryDirectory() as tmp:
        # llava-min maps the files into memory; the mapping outlives their deletion (POSIX).
        folder = pathlib.Path(tmp)
        hf = write_tiny_llava(folder, LLM_CONFIG, vit=VIT, image_token_id=IMAGE_TOKEN_ID, seed=seed,
                              num_shards=2, attn_implementation="sdpa", llm_std=0.02)
        ours = LLaVA.from_pretrained(llm=folder / "llm", vit=folder / "vit", projector=folder / "projector")
    for model, vit in ((ours, ours.vit), (hf, hf.model.vision_tower)):
        model.train(train)
        if train:
            vit.requires_grad_(False)
    return ours, hf


def set_checkpointing(ours, hf, flag: bool) -> None:
    """Per-block recomputation on (True) or off for both models; transformers' non-reentrant variant, as ours."""
    ours.set_gradient_checkpointing(flag)
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):       # transformers >= 5.x names; the old ones warn
        hf.activation_checkpointing_enable(kwargs) if flag else hf.activation_checkpointing_disable()
    elif flag:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_disable()


def sft_batch(batch: int = 2, text_tokens: int = TEXT_TOKENS, prompt_tokens: int = PROMPT_TOKENS, seed: int = 0):
    """Rows [bos, <image>, prompt..., answer...] of `text_tokens` each (the placeholder counts as one), with
    labels -100 on everything but the answer, as in stage-2 SFT data. Returns our tensors and transformers'."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, LLM_CONFIG.vocab_size - 1, (batch, text_tokens), generator=g)
    ids[:, 0], ids[:, 1] = 1, IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :prompt_tokens] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    hf_ids, hf_mask, hf_labels = expand_image_tokens(ids, mask, N_PATCHES, IMAGE_TOKEN_ID, labels)
    ours = dict(input_ids=ids, pixel_values=pixel_values, labels=labels, attention_mask=mask)  # as train.py calls it
    theirs = dict(input_ids=hf_ids, pixel_values=pixel_values, attention_mask=hf_mask, labels=hf_labels)
    return ours, theirs


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each callable `repeats` times, alternating between them (and their order every round) so that
    drift in machine load hits all alike. Returns name -> list of seconds."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def report(title: str, times: dict[str, list[float]]) -> float:
    """Print medians (and the spread) and the speed ratio transformers / llava-min (> 1: llava-min is faster),
    from the medians and from the minima (the fastest run of each is the one least disturbed by other load)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, v in times.items():
        print(f"  {title:<36} {name:<13} median {med[name] * 1e3:9.2f} ms   "
              f"(min {min(v) * 1e3:.2f}, max {max(v) * 1e3:.2f}, n={len(v)})")
    ratio = med["transformers"] / med["llava-min"]
    print(f"  {title:<36} speed ratio llava-min / transformers: {ratio:.2f}x "
          f"(from the minima: {min(times['transformers']) / min(times['llava-min']):.2f}x)")
    return ratio

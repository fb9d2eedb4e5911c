"""GPU memory per process and host RAM per node for a training configuration, from the model
configs alone.

    python -m llava_min.memory --llm-config internlm2-7b --vit-config dinov2-large --batch-size 1 --nproc 4 --gpu-mem 24
    python -m llava_min.memory --llm internlm2-7b/ --vit dinov2-large/ --lora-r 128 --grad-checkpointing --json

finetune.py's flags and defaults (others are ignored). Start at `estimate` (one GPU) and
`host_bytes` (one node). tests/test_memory.py checks the activation model within 3% against what
autograd saves (`saved_activation_bytes`); bench/gpu.py compares the total with a GPU's peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import LlavaMinError, dinov2, internlm2, llava, weights
from ..image import check_image_size

GiB = 2**30
CUDA_CONTEXT = 0.75 * GiB               # context and cuBLAS workspaces
NCCL_BUFFERS = 0.5 * GiB                # when world size > 1
# A card fits at most 95% full (the rest is allocator slack)
FIT_FRACTION = 0.95
# A rank's Python, torch and (on CUDA) CUDA libraries, before any tensor
PROCESS_BASE = 1.5 * GiB
# A forked loader worker's own pages: its heap, image decoding
WORKER_BASE = 0.3 * GiB
# transformers' default shard size, for a checkpoint not at hand
MAX_SHARD = 5 * 10**9
# json.load's peak RSS / file size for LLaVA data (1 GB file: 3.5 GB)
JSON_PEAK = 3.5


@dataclass
class Plan:
    """One training configuration, as finetune.py's flags describe it."""
    llm: internlm2.InternLM2Config
    # A vision tower's config (DINOv2Config, CLIPConfig, SigLIPConfig, ...)
    vit: object
    train: tuple[str, ...] = ("projector", "llm")
    lora_r: int = 0
    lora_dropout: float = 0.05
    batch_size: int = 16
    max_length: int = 2048
    image_size: int = 336
    grad_checkpointing: bool = False
    dtype: str = "bfloat16"
    zero: bool = False
    fsdp: bool = False
    world_size: int = 1
    images_per_sample: int = 1
    select_layer: int = -2
    loss_chunk: int = 1024              # as llava.LLaVA.forward's
    # "cpu": no CUDA context, dropout masks in a, the model in host RAM
    device: str = "cuda"
    # train.py builds DDP(gradient_as_bucket_view=True): no bucket copy
    ddp_bucket_view: bool = True
    nproc_per_node: int = 1             # ranks sharing one node's host RAM (default: every rank)
    num_workers: int = 4
    prefetch: int = 2                   # loader.Loader's batches in flight per worker
    # Size of the --data files (the sample table each rank holds)
    data_bytes: int = 0
    shard_bytes: int = 0                # largest safetensors file of the sources (0: not at hand)

    @property
    def act_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    @property
    def image_tokens(self) -> int:
        return self.vit.image_tokens(self.image_size)

    @property
    def llm_mode(self) -> str:
        return "frozen" if "llm" not in self.train else "lora" if self.lora_r else "full"

    def replace(self, **changes) -> "Plan":
        return dataclasses.replace(self, **changes)


@dataclass
class Estimate:
    """Bytes per GPU, by what holds them. `activations` is itemised; `total` is the peak."""
    params: dict[str, int]
    weights: int
    gradients: int
    ddp_buckets: int
    optimizer: int
    optimizer_unsharded: int
    autocast_copies: int
    activations: dict[str, int]
    activations_other_mode: int      # the activation total with grad checkpointing flipped
    vit_transient: int
    logits: int
    cuda_context: int
    # FSDP: whole (all-gathered) units and their unsharded gradients, live at once
    fsdp_gathered: int = 0
    load_peak: int = 0               # FSDP: a rank's GPU bytes while rank 0 broadcasts the weights
    # FSDP: rank 0's host bytes then (the whole model, read on the CPU)
    load_host_rank0: int = 0
    total: int = 0

    @property
    # Held from forward to backward (recompute happens inside backward)
    def saved_activations(self) -> int:
        return sum(v for k, v in self.activations.items() if "recompute" not in k)

    @property
    def activation_total(self) -> int:
        return sum(self.activations.values())


# Parameters

def lora_parameters(c: internlm2.InternLM2Config, r: int) -> int:
    """A (r x in) and B (out x r) for wqkv, wo, w1, w3, w2 in every block."""
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    h = c.hidden_size
    i = c.intermediate_size
    in_plus_out = (h + qkv) + (h + h) + 2 * (h + i) + (i + h)
    return c.num_hidden_layers * r * in_plus_out


_VIT_COUNTS: dict[tuple[str, int], dict[str, int]] = {}


def vit_counts(v, select_layer: int) -> dict[str, int]:
    """A vision tower's tensor counts, from the tower itself built on meta (through its contract:
    `blocks`, `freeze_unused`), cached, as the fit search asks hundreds of times. "all": every
    tensor of its state dict (buffers such as DINOv2's mask_token included); "parameters"; "block":
    one block's; "run": the parameters features(select_layer) uses, what a trained ViT trains;
    "run_matmul": those of its linear and convolution layers (what autocast casts); "embeddings":
    the run parameters outside the blocks (an FSDP root's)."""
    key = (repr(v), select_layer)
    if key not in _VIT_COUNTS:
        tower = weights.build_on_meta(lambda: llava.tower_of(v)(v))
        tower.freeze_unused(select_layer)
        size = {id(p): p.numel() for p in tower.parameters()}
        run = {id(p) for p in tower.parameters() if p.requires_grad}
        in_blocks = {id(p) for p in tower.blocks.parameters()}
        matmul = {id(p) for m in tower.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters()}
        _VIT_COUNTS[key] = {
            "all": sum(t.numel() for t in tower.state_dict().values()),
            "parameters": sum(size.values()),
            "block": sum(p.numel() for p in tower.blocks[0].parameters()),
            "run": sum(size[i] for i in run),
            "run_matmul": sum(size[i] for i in run & matmul),
            "embeddings": sum(size[i] for i in run - in_blocks),
        }
    return _VIT_COUNTS[key]


def param_counts(plan: Plan) -> dict[str, int]:
    """The checkpoints' tensor counts (DINOv2's mask_token buffer included). "trained": what gets
    gradients and AdamW state; "unused": a trained ViT's blocks after select_layer and its final
    norm (fp32, never run)."""
    c = plan.llm
    h = c.hidden_size
    vit = vit_counts(plan.vit, plan.select_layer)
    vit_trains = "vit" in plan.train
    counts = {"llm": internlm2.num_parameters(c), "vit": vit["all"],
              # Linear(D, h), GELU, Linear(h, h), with biases
              "projector": plan.vit.hidden_size * h + h + h * h + h,
              "lora": lora_parameters(c, plan.lora_r) if plan.lora_r else 0}
    trained = {"projector": counts["projector"] if "projector" in plan.train else 0,
               "llm": 0,
               "vit": vit["run"] if vit_trains else 0}
    if "llm" in plan.train:
        trained["llm"] = counts["lora"] if plan.lora_r else counts["llm"]
    counts["trained"] = sum(trained.values())
    counts["unused"] = vit["parameters"] - vit["run"] if vit_trains else 0
    counts["frozen"] = (counts["llm"] + counts["vit"] + counts["projector"] + counts["lora"]
                        - counts["trained"] - counts["unused"])
    # The trained parameters that autocast casts to bf16: matrices of linear / conv layers (and
    # their biases, the output head included), not the embedding, norms, position tables, cls /
    # registers or layer scales.
    llm_matmul = counts["llm"] - c.vocab_size * h - (2 * c.num_hidden_layers + 1) * h
    if plan.lora_r:
        llm_matmul = counts["lora"]
    counts["trained_matmul"] = (trained["projector"] + llm_matmul * ("llm" in plan.train)
                                + vit["run_matmul"] * vit_trains)
    return counts


def vit_mlp_saves(v, a: int) -> int:
    """Bytes one token of a trained ViT block's MLP (and DINOv2's layer scales) saves for
    backward."""
    F = v.ffn_hidden_size
    if isinstance(v, dinov2.DINOv2Config):
        # the two LayerScales save their inputs; giant's SwiGLU saves gate, up, their silu and the
        # product
        scales = 2 * a * v.hidden_size
        return scales + a * (4 * F if v.use_swiglu_ffn else 2 * F)
    if v.hidden_act == "quick_gelu":
        # CLIP: x * sigmoid(1.702 x) keeps fc1's output, the sigmoid and the product (fc2's input)
        return 3 * a * F
    # erf or tanh GELU: fc1's output and fc2's input
    return 2 * a * F


# Activations: bytes autograd saves for backward. a = 2 in bf16 (4 in fp32); r = the residual
# stream's bytes (4 when the LLM trains in fp32 master weights, else a); h hidden, kv = kv_heads x
# head_dim, i intermediate, nh heads, hd head_dim; N = batch x max_length LLM positions, image
# tokens included.

def activation_bytes(plan: Plan) -> dict[str, int]:
    """Itemised activation bytes at the peak (the start of backward)."""
    c = plan.llm
    v = plan.vit
    a = plan.act_bytes
    mode = plan.llm_mode
    h = c.hidden_size
    i = c.intermediate_size
    nh = c.num_attention_heads
    hd = c.head_dim
    L = c.num_hidden_layers
    kv = c.num_key_value_heads * hd
    r = 4 if mode == "full" else a
    N = plan.batch_size * plan.max_length
    n_images = plan.batch_size * plan.images_per_sample
    # What one InternLM2 block saves per token. Attention: the rotated q|k buffer (q is a view of
    # it; k and v are copied out so the fused qkv buffer is freed), v, the output (= wo's input),
    # the lse, the bf16 rotary tables
    attention = a * (2 * h + 2 * kv) + 4 * nh + (a * hd if r != a else 0)
    if mode == "full":
        # each RMSNorm's fp32 input (LeanRMSNorm recomputes the rest), its output, and the bf16
        # copy each linear makes of its input (w1 and w3 make one each)
        norms = (4 + a) * h + 4 * h + (a * h if r == a else 2 * a * h)
        # w1 out, w3 out (SwiGLU keeps no silu), their product (w2's input)
        mlp = 3 * a * i
    else:
        # Frozen linears save nothing: no weight gradient. Each RMSNorm keeps its input and rstd.
        norms = 2 * (4 * h + 4)
        # w1 out, w3 out, for SwiGLU's backward
        mlp = 2 * a * i
    block = norms + attention + mlp
    if mode == "lora":
        # per adapted linear (inputs summed: 4h + i): the dropout mask (1 byte from CUDA's fused
        # dropout, a on the CPU) and the adapter's input, plus the r-wide middle of each of wqkv,
        # wo, w1, w2, w3
        mask = (1 if plan.device == "cuda" else a) if plan.lora_dropout > 0 else 0
        block += (4 * h + i) * (mask + a) + 5 * plan.lora_r * a
    if plan.batch_size > 1 and plan.device == "cuda":
        # the padded-batch attention path repeats k and v to all heads and saves a float mask per
        # block
        block += 2 * a * (h - kv) + a * plan.max_length
    # The last block is booked in full, an upper bound: its output projection and MLP run on the
    # supervised tokens only (at most 1/L of the blocks' total less).
    block *= N
    items = {}
    if plan.grad_checkpointing:
        # Each block keeps its input, and all of them the rotary tables (cos and sin, hd / 2 wide,
        # one row of positions) ...
        items["llm blocks (inputs kept)"] = L * r * h * N + r * hd * plan.max_length
        # ... and one is recomputed at a time in backward
        items["llm recompute (one block)"] = block
    else:
        items["llm blocks"] = L * block
    # ids and splice indices, the final norm, and each supervised token's gathered hidden state
    supervised = max(0, N - n_images * plan.image_tokens)
    # (LeanRMSNorm keeps no rstd)
    final_norm = 4 * h + 4 * (mode != "full")
    items["llm outside blocks"] = 16 * N + final_norm * N + (r * h + 24) * supervised
    # the prefix (CLS, registers) and the patches
    vit_tokens = n_images * (v.prefix_tokens + plan.image_tokens)
    if "projector" in plan.train:
        items["projector"] = n_images * plan.image_tokens * a * (v.hidden_size + 2 * h)
    # A frozen ViT runs under no_grad: nothing saved
    if "vit" in plan.train:
        blocks = v.blocks_run(plan.select_layer)
        D = v.hidden_size
        per_token = (2 * (4 * D + 8)                                   # two norms: the residual stream is fp32
                     # q/k/v inputs (a bf16 copy each), fc1's
                     + (3 * a * D if a == 2 else a * D) + a * D
                     # q, k, v, output (= dense input), lse
                     + 4 * a * D + 4 * v.num_attention_heads
                     + vit_mlp_saves(v, a))
        vit_block = per_token * vit_tokens
        pixels = n_images * 3 * plan.image_size ** 2 * a    # the patch convolution's input
        if plan.grad_checkpointing:
            items["vit blocks (inputs kept)"] = blocks * 4 * D * vit_tokens + pixels
            items["vit recompute (one block)"] = vit_block
        else:
            items["vit blocks"] = blocks * vit_block + pixels
    return {k: int(val) for k, val in items.items()}


def saved_activation_bytes(model, fn):
    """Measure: (bytes, fn()), the bytes of the distinct tensor storages autograd saves for
    backward while fn() runs, parameters left out: the activation memory held from forward to
    backward, whatever the allocator does."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(saved.values()), result


def fsdp_gathered_bytes(plan: Plan) -> int:
    """Under FSDP, what is whole besides the shards, in the compute dtype: the root unit
    (embedding, final norm, head, projector, a trained ViT's embeddings) until backward ends, two
    decoder layers (running, prefetched; ViT blocks are smaller), the unsharded gradients of root
    and one layer (the root's fp32 copy comes after the activations)."""
    c = plan.llm
    v = plan.vit
    a = plan.act_bytes
    layer = (internlm2.num_parameters(dataclasses.replace(c, num_hidden_layers=2))
             - internlm2.num_parameters(dataclasses.replace(c, num_hidden_layers=1)))
    lora = lora_parameters(c, plan.lora_r) // c.num_hidden_layers if plan.lora_r else 0
    projector = param_counts(plan)["projector"]
    llm_root = internlm2.num_parameters(c) - c.num_hidden_layers * layer
    vit_root = vit_counts(v, plan.select_layer)["embeddings"] if "vit" in plan.train else 0
    trained_layer = {"full": layer, "lora": lora, "frozen": 0}[plan.llm_mode]
    trained_root = llm_root * (plan.llm_mode == "full") + vit_root + projector * ("projector" in plan.train)
    # A layer's gradients cast for the reduce-scatter
    fp32_copy = 4 * trained_layer if a == 2 else 0
    whole = llm_root + projector + vit_root + 2 * (layer + lora)
    return int(a * whole + a * (trained_root + trained_layer) + fp32_copy)


# The GPU estimate

def estimate(plan: Plan) -> Estimate:
    if not plan.train or not set(plan.train) <= set(llava.PARTS):
        raise LlavaMinError(f"--train {','.join(plan.train)}: use a comma list of {', '.join(llava.PARTS)}, or all")
    check_image_size(plan.image_size, plan.image_size, plan.vit.patch_size)
    need = plan.images_per_sample * plan.image_tokens
    if plan.max_length <= need:
        raise LlavaMinError(f"--max-length {plan.max_length} leaves no room for text after {need} image tokens "
                            f"({plan.image_size} px / {plan.vit.patch_size} px patches)")
    if plan.lora_r and "llm" not in plan.train:
        raise LlavaMinError("--lora-r trains the LLM through adapters: add llm to --train")
    if plan.batch_size < 1 or plan.world_size < 1:
        raise LlavaMinError(f"--batch-size ({plan.batch_size}) and the world size ({plan.world_size}) must be >= 1")
    p = param_counts(plan)
    world = plan.world_size
    a = plan.act_bytes
    v = plan.vit
    c = plan.llm
    fsdp = plan.fsdp and world > 1
    # fp32 master weights for what trains
    weights = 4 * (p["trained"] + p["unused"]) + a * p["frozen"]
    # AdamW's exp_avg and exp_avg_sq in fp32
    optimizer = 8 * p["trained"]
    # FSDP: a frozen ViT stays whole on each rank
    outside = p["vit"] * a if "vit" not in plan.train else 0
    held = (weights - outside) // world + outside if fsdp else weights
    supervised = max(1, plan.batch_size * (plan.max_length - need))
    vit_tokens = plan.batch_size * plan.images_per_sample * (v.prefix_tokens + plan.image_tokens)
    other = activation_bytes(plan.replace(grad_checkpointing=not plan.grad_checkpointing))
    # FSDP load: every rank allocates its shards (no rank builds the model on its GPU), then each
    # tensor arrives whole from rank 0 in turn and the rank keeps its slice: the largest one (the
    # embedding or the head) in flight
    in_flight = max(c.vocab_size, c.intermediate_size) * c.hidden_size * (4 if plan.llm_mode == "full" else a)
    e = Estimate(
        params=p,
        weights=held,
        gradients=4 * p["trained"] // world if fsdp else 4 * p["trained"],
        # gradient_as_bucket_view=True: gradients live in DDP's flat all-reduce buckets, not beside
        # them
        ddp_buckets=4 * p["trained"] if world > 1 and not plan.ddp_bucket_view else 0,
        # ZeRO-1, FSDP
        optimizer=optimizer // world if (plan.zero or plan.fsdp) and world > 1 else optimizer,
        optimizer_unsharded=optimizer,
        # autocast casts each trained fp32 matrix to bf16 once per forward and keeps it until
        # backward; under FSDP the bf16 all-gathers are the compute copies
        autocast_copies=2 * p["trained_matmul"] if plan.dtype == "bfloat16" and not fsdp else 0,
        activations=activation_bytes(plan),
        activations_other_mode=sum(other.values()),
        # a frozen ViT's no_grad forward, before the LLM runs: at its peak a few live tensors of
        # one block
        vit_transient=0 if "vit" in plan.train else int(vit_tokens * a * (6 * v.hidden_size + 2 * v.ffn_hidden_size)),
        # the cross-entropy chunk in backward: fp32 log-softmax, its gradient and one more, plus
        # the logits
        logits=int(min(plan.loss_chunk, supervised) * c.vocab_size * (12 + a)),
        cuda_context=int(CUDA_CONTEXT + (NCCL_BUFFERS if world > 1 else 0)) if plan.device == "cuda" else 0,
        fsdp_gathered=fsdp_gathered_bytes(plan) if fsdp else 0,
        load_peak=held + in_flight if fsdp else 0,
        # Rank 0 alone reads the model, on the CPU
        load_host_rank0=weights if fsdp else 0,
    )
    e.total = (e.weights + e.gradients + e.ddp_buckets + e.optimizer + e.autocast_copies + e.cuda_context
               + e.fsdp_gathered + max(e.activation_total + e.logits, e.vit_transient))
    return e


# Host RAM of one node

def host_ram() -> tuple[int, int]:
    """(MemTotal, MemAvailable) of this machine in bytes, (0, 0) where /proc/meminfo is missing."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        return int(info["MemTotal"].split()[0]) * 1024, int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


def host_bytes(plan: Plan) -> dict:
    """Host RAM of one node while reading the data, loading the model and training: one rank's
    bytes in each phase ("rank_start", "rank_load", "rank_training"), one loader worker's, and the
    node's ("start", "load", "training")."""
    # The packed sample table is about the size of the JSON it came from
    table = plan.data_bytes
    rank = {"Python + torch": PROCESS_BASE, "sample table": table}
    # A batch as the loader hands it over: fp32 pixels, int64 ids and labels, in shared memory (its
    # pages are counted once). In flight: prefetch per worker, plus the one being trained on and
    # the previous one.
    batch = plan.batch_size * (plan.images_per_sample * 3 * plan.image_size ** 2 * 4 + 2 * 8 * plan.max_length)
    phases = {"start": {"Python + torch": PROCESS_BASE, "json.load peak": JSON_PEAK * table}, "load": dict(rank),
              "training": {**rank, "batches in flight": (plan.prefetch * plan.num_workers + 2) * batch}}
    if plan.device == "cuda":
        # Each tensor goes from its memory-mapped file straight to the GPU: one shard's pages at a
        # time. Not at hand (a preset): as if the released bf16 checkpoint were read.
        phases["load"]["one checkpoint shard"] = plan.shard_bytes or min(MAX_SHARD,
                                                                         2 * internlm2.num_parameters(plan.llm))
    else:
        # The device is the host: the whole model in its final dtypes, then gradients, AdamW and
        # activations.
        e = estimate(plan)
        phases["load"].update({"weights": e.weights, "one checkpoint shard": plan.shard_bytes})
        phases["training"]["model, gradients, AdamW, activations"] = e.total
    out = {f"rank_{k}": {name: int(b) for name, b in v.items()} for k, v in phases.items()}
    # A forked worker shares its rank's sample table (pages read, never written) and the
    # shared-memory batches.
    out["worker"] = {"own pages": int(WORKER_BASE)}
    for k in phases:
        workers = 0
        if k == "training":
            workers = plan.num_workers * out["worker"]["own pages"]
        out[k] = plan.nproc_per_node * (sum(out[f"rank_{k}"].values()) + workers)
    # FSDP on GPUs: rank 0 alone reads the whole model into host RAM, then sends each rank its
    # shards; the other ranks build on the meta device. One node holds that rank 0's extra bytes.
    out["rank0_load_extra"] = 0
    if plan.device == "cuda" and plan.fsdp and plan.world_size > 1:
        out["rank0_load_extra"] = int(estimate(plan).load_host_rank0)
        out["load"] += out["rank0_load_extra"]
    return out


def host_warning(plan: Plan, host_gib: float) -> str | None:
    """A warning line when a phase needs more than the node's RAM (None if it fits or the RAM is
    unknown)."""
    h = host_bytes(plan)
    phase = max(("start", "load", "training"), key=lambda k: h[k])
    if not host_gib or h[phase] <= host_gib * GiB:
        return None
    workers = "fewer --num-workers, " if phase == "training" and plan.num_workers else ""
    return (f"WARNING: host RAM: {h[phase] / GiB:.1f} GiB per node during {phase} exceeds this node's "
            f"{host_gib:.1f} GiB; the kernel's OOM killer would end a rank. Use {workers}fewer ranks per node, "
            "or a node with more memory")


# The fit search

def fits(plan: Plan, gpu_gib: float) -> bool:
    return estimate(plan).total <= FIT_FRACTION * gpu_gib * GiB


def _largest(fits_at, lo: int, hi: int) -> int:
    """The largest n in (lo, hi] with fits_at(n), else lo; binary search (fits_at is monotone)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits_at(mid) else (lo, mid - 1)
    return lo


def largest_batch(plan: Plan, gpu_gib: float) -> int:
    """The largest micro-batch that fits (0: not even 1)."""
    return _largest(lambda b: fits(plan.replace(batch_size=b), gpu_gib), 0, 4096)


def largest_length(plan: Plan, gpu_gib: float) -> int:
    """The largest --max-length (a multiple of 64, at most max_position_embeddings) that fits; 0 if
    none."""
    floor = plan.images_per_sample * plan.image_tokens // 64
    top = plan.llm.max_position_embeddings // 64
    # 64 x floor: no text room
    n = _largest(lambda n: fits(plan.replace(max_length=64 * n), gpu_gib), floor, top)
    return 64 * n if n > floor else 0


def suggest_fit(plan: Plan, gpu_gib: float) -> list[str]:
    """Flags that make `plan` fit a `gpu_gib` GiB card: a smaller micro-batch (--grad-accum keeps
    the global batch), else the levers in turn, then a shorter --max-length; unneeded levers are
    dropped. Last: the estimate or why not."""
    if fits(plan, gpu_gib):
        return [f"already fits: {estimate(plan).total / GiB:.1f} GiB of {gpu_gib:g} GiB"]
    shardable = plan.world_size > 1 and not plan.fsdp
    levers = [(flag, change) for flag, change, useful in [
        ("--dtype bfloat16", {"dtype": "bfloat16"}, plan.dtype != "bfloat16"),
        ("--grad-checkpointing", {"grad_checkpointing": True}, not plan.grad_checkpointing),
        ("--zero", {"zero": True}, shardable and not plan.zero),
        ("--fsdp", {"fsdp": True, "zero": False}, shardable),
        ("--lora-r 128 (train the LLM through adapters)", {"lora_r": 128}, plan.llm_mode == "full"),
        ("--lora-r 32", {"lora_r": 32}, plan.llm_mode != "frozen" and (plan.lora_r or 128) > 32)] if useful]

    # Later levers override earlier ones (--lora-r 32 after 128)
    def build(chosen, **more) -> Plan:
        return plan.replace(**{k: v for _, change in chosen for k, v in change.items()} | more)

    applied = []
    length = plan.max_length
    batch = min(largest_batch(plan, gpu_gib), plan.batch_size)
    while not batch and len(applied) < len(levers):
        applied.append(levers[len(applied)])
        batch = min(largest_batch(build(applied), gpu_gib), plan.batch_size)
    if not batch:
        batch = 1
        length = largest_length(build(applied, batch_size=1), gpu_gib)
        if not length:
            need = estimate(build(applied, batch_size=1)).total / GiB
            return [flag for flag, _ in applied] + [
                f"does not fit even so: {need:.1f} GiB at batch 1; use more GPUs with --zero, a card with more "
                "memory, or a smaller LLM (--llm-config internlm2-1_8b)"]
    for lever in list(applied):               # drop what the chosen batch and length do not need
        trial = [x for x in applied if x is not lever]
        if fits(build(trial, batch_size=batch, max_length=length), gpu_gib):
            applied = trial
    flags = [flag for flag, _ in applied]
    if batch < plan.batch_size:
        flags.append(f"--batch-size {batch} with --grad-accum x{-(-plan.batch_size // batch)} (same global batch)")
    if length < plan.max_length:
        flags.append(f"--max-length {length} (longer samples are truncated)")
    total = estimate(build(applied, batch_size=batch, max_length=length)).total
    return flags + [f"-> {total / GiB:.1f} GiB of {gpu_gib:g} GiB"]


# From finetune.py's arguments

def plan_from_args(args, world_size: int | None = None, device: str | None = None) -> Plan:
    """A Plan from an argparse namespace with finetune.py's names (missing ones take the
    defaults)."""
    # Absent or None: the default
    given = {name: value for name, value in vars(args).items() if value is not None}
    init = Path(given.get("init_from")) if given.get("init_from") else None
    llm_source = given.get("llm") or given.get("llm_config") or (init / "llm" if init else None)
    vit_source = given.get("vit") or given.get("vit_config") or (init / "vit" if init else None)
    if llm_source is None or vit_source is None:
        raise LlavaMinError("give --llm DIR or --llm-config NAME_OR_JSON, and --vit DIR or --vit-config "
                            "NAME_OR_JSON (or --init-from DIR)")
    image_size = given.get("image_size")
    if image_size is None and init is not None and (init / "llava_config.json").exists():
        image_size = json.loads((init / "llava_config.json").read_text()).get("image_size")
    parts = llava.parse_parts(given.get("train", "projector,llm"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sources = [Path(s) for s in (given.get("llm"), given.get("vit"), init and init / "llm", init and init / "vit") if s]
    shards = [f.stat().st_size for s in sources if s.is_dir() for f in s.glob("*.safetensors")]
    if not world_size:
        world_size = given.get("world_size") or int(os.environ.get("WORLD_SIZE", 1))
    # Ranks on one node: torchrun's LOCAL_WORLD_SIZE, else every rank of the job (--nproc on one
    # node) unless --nproc-per-node says otherwise.
    nproc_per_node = given.get("nproc_per_node") or int(os.environ.get("LOCAL_WORLD_SIZE", 0))
    nproc_per_node = nproc_per_node or world_size
    same_names = ("lora_r", "lora_dropout", "batch_size", "max_length", "grad_checkpointing", "zero", "fsdp",
                  "num_workers", "images_per_sample")
    plan = Plan(llm=internlm2.load_config(llm_source), vit=llava.vision_config(vit_source),
                train=tuple(p for p in llava.PARTS if p in parts), image_size=image_size or 336,
                dtype=given.get("dtype") or ("bfloat16" if device == "cuda" else "float32"),
                world_size=world_size, device=device, nproc_per_node=nproc_per_node,
                data_bytes=sum(Path(f).stat().st_size for f in given.get("data", []) if Path(f).is_file()),
                shard_bytes=max(shards, default=0),
                **{name: given[name] for name in same_names if name in given})
    # --pack N: a row of whole samples, each with at most one image, booked as N positions with as
    # many images as fit (each with a text token at least): an upper bound for the ViT's share
    pack = given.get("pack")
    return plan.replace(max_length=pack, images_per_sample=max(1, pack // (plan.image_tokens + 1))) if pack else plan


# Report

def report(plan: Plan, gpu_gib: float | None = None, host_gib: float | None = None) -> str:
    """The table train.py prints at start-up. host_gib: the node's RAM (default: this machine's
    MemTotal)."""
    e = estimate(plan)
    world = plan.world_size
    ckpt = "on" if plan.grad_checkpointing else "off"
    p = e.params
    fsdp = plan.fsdp and world > 1
    unsharded = e.optimizer_unsharded / GiB
    zero = f"; with --zero over {world} ranks: {unsharded / world:.2f}" if world > 1 else ""
    optimizer_note = (f"{'FSDP' if fsdp else 'ZeRO-1'} over {world} ranks (unsharded {unsharded:.2f})"
                      if e.optimizer != e.optimizer_unsharded else "trained x 8 B" + zero)
    rows = [("weights", e.weights, f"trained x 4 B + frozen x {plan.act_bytes} B"
             + (f", / {world} (a frozen ViT whole)" if fsdp else "")),
            ("gradients", e.gradients, "trained x 4 B" + (f" / {world}" if fsdp else "")),
            ("DDP gradient buckets", e.ddp_buckets,
             "trained x 4 B (0 with gradient_as_bucket_view)" if e.ddp_buckets else "none"),
            ("optimizer (AdamW m, v)", e.optimizer, optimizer_note),
            ("autocast bf16 weight copies", e.autocast_copies, "")]
    if fsdp:
        rows.append(("FSDP gathered units + grads", e.fsdp_gathered, "root + 2 decoder layers whole (prefetch), "
                     f"unsharded grads of root + 1 layer; at load: {e.load_peak / GiB:.2f} (shards + 1 tensor; "
                     f"rank 0's host RAM {e.load_host_rank0 / GiB:.2f})"))
    rows.append(("activations", e.activation_total, f"(checkpointing {ckpt}; "
                 f"{'off' if plan.grad_checkpointing else 'on'}: {e.activations_other_mode / GiB:.2f})"))
    rows += [("  " + name, b, "") for name, b in e.activations.items()]
    if e.vit_transient:
        rows.append(("  frozen ViT (no_grad)", 0, f"transient peak {e.vit_transient / GiB:.2f}"))
    rows += [("cross-entropy logits chunk", e.logits, ""),
             ("CUDA context + NCCL" if world > 1 else "CUDA context", e.cuda_context, ""),
             ("total (peak)", e.total, "")]
    lines = [
        f"memory per {'GPU' if plan.device == 'cuda' else 'process'}: {world} process{'es' if world > 1 else ''}"
        f"{(', FSDP' if fsdp else ', DDP') if world > 1 else ''}, {plan.dtype}"
        f"{' autocast, fp32 master weights' if plan.dtype == 'bfloat16' else ''}",
        f"  parameters: LLM {p['llm']:,}, ViT {p['vit']:,}, projector {p['projector']:,}"
        + (f", LoRA r={plan.lora_r} {p['lora']:,}" if plan.lora_r else ""),
        f"  trained: {', '.join(plan.train)}{' (LLM through LoRA)' if plan.lora_r else ''} = {p['trained']:,} "
        f"(fp32); frozen {p['frozen']:,} ({plan.dtype})",
        f"  sequence: batch {plan.batch_size} x {plan.max_length} tokens, {plan.image_tokens} image tokens per "
        f"image ({plan.image_size} px); gradient checkpointing {ckpt}",
        "", "                                        GiB",
    ] + [f"  {name:33s}{b / GiB:8.2f}" + (f"   {note}" if note else "") for name, b, note in rows]
    if gpu_gib:
        ok = fits(plan, gpu_gib)
        lines += ["", f"on a {gpu_gib:g} GiB card: {'fits' if ok else 'does NOT fit'} "
                      f"({e.total / GiB:.1f} GiB, limit {FIT_FRACTION:.0%} of the card)",
                  f"  largest micro-batch at {plan.max_length} tokens: {largest_batch(plan, gpu_gib)}"
                  + ("" if plan.grad_checkpointing else f" (with --grad-checkpointing: "
                     f"{largest_batch(plan.replace(grad_checkpointing=True), gpu_gib)})"),
                  f"  largest --max-length at batch {plan.batch_size}: {largest_length(plan, gpu_gib)}"]
        if not ok:
            lines += ["  to fit: " + "; ".join(suggest_fit(plan, gpu_gib))]
    h = host_bytes(plan)
    n = plan.nproc_per_node
    w = plan.num_workers
    host_gib = host_ram()[0] / GiB if host_gib is None else host_gib
    worker = f"; + {w} worker{'s' if w > 1 else ''} x {sum(h['worker'].values()) / GiB:.2f}" if w else ""
    lines += ["", f"host RAM per node: {n} rank{'s' if n > 1 else ''}, {w} loader worker{'s' if w != 1 else ''} each"
                  "         GiB"]
    for label, phase in (("reading the data", "start"), ("loading", "load"), ("training", "training")):
        items = ", ".join(f"{k} {v / GiB:.2f}" for k, v in h[f"rank_{phase}"].items() if v)
        line = f"  {label:17s}{h[phase] / GiB:8.2f}   {n} x ({items}{worker if phase == 'training' else ''})"
        if phase == "load" and h["rank0_load_extra"]:
            line += f" + rank 0's whole model {h['rank0_load_extra'] / GiB:.2f} (FSDP)"
        lines.append(line)
    if host_gib:
        lines.append(host_warning(plan, host_gib) or f"  fits this node's {host_gib:.1f} GiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", help="InternLM2 folder (its config.json is read)")
    p.add_argument("--llm-config", help="preset (tiny, internlm2-1_8b, internlm2-7b) or config.json")
    p.add_argument("--vit", help="vision tower folder: DINOv2, CLIP or SigLIP (its config.json is read)")
    p.add_argument("--vit-config", help="preset (dinov2-small/-base/-large/-giant[-reg], clip-vit-large-patch14-336, "
                                        "siglip-so400m-patch14-384, siglip-base-patch16-224, ...) or config.json")
    p.add_argument("--init-from", help="a folder written by train.py: its llm/ and vit/ configs")
    p.add_argument("--train", default="projector,llm", help="comma list of projector,llm,vit, or all")
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch per process")
    p.add_argument("--max-length", type=int, default=2048, help="LLM sequence, image tokens included")
    p.add_argument("--image-size", type=int, help="square ViT input (default 336)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--pack", type=int, default=0, help="packed rows of this many positions (--batch-size rows)")
    p.add_argument("--images-per-sample", type=int, help="images in each sample (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--zero", action="store_true", help="ZeRO-1: shard the optimizer state over the ranks")
    p.add_argument("--fsdp", action="store_true", help="FSDP2: shard parameters, gradients and optimizer state")
    p.add_argument("--world-size", "--nproc", dest="world_size", type=int, help="processes (GPUs) in the job")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where training runs")
    p.add_argument("--data", nargs="+", default=[], help="the data files (their size: each rank's sample table)")
    p.add_argument("--num-workers", type=int, default=4, help="loader worker processes per rank")
    p.add_argument("--nproc-per-node", type=int, help="ranks per node for host RAM (default: LOCAL_WORLD_SIZE, else 1)")
    p.add_argument("--gpu-mem", type=float, help="GiB per GPU to fit in (default: this machine's GPU, else 24)")
    p.add_argument("--host-ram-gib", type=float, default=host_ram()[0] / GiB,
                   help="RAM of one node in GiB (default: this machine's MemTotal)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args, ignored = p.parse_known_args(argv)
    try:
        plan = plan_from_args(args, device=args.device)
    except ValueError as e:
        p.error(str(e))
    gpu_gib = args.gpu_mem or (torch.cuda.get_device_properties(0).total_memory / GiB if torch.cuda.is_available()
                               else 24.0)
    if args.json:
        e = estimate(plan)
        est = dataclasses.asdict(e) | {"saved_activations": e.saved_activations, "activation_total": e.activation_total}
        out = {"plan": dict(dataclasses.asdict(plan), llm=plan.llm.to_dict(), vit=plan.vit.to_dict()),
               "estimate": est, "gib": {k: round(v / GiB, 3) for k, v in est.items() if isinstance(v, int)},
               "gpu_gib": gpu_gib, "fits": fits(plan, gpu_gib), "largest_batch": largest_batch(plan, gpu_gib),
               "largest_max_length": largest_length(plan, gpu_gib), "suggest_fit": suggest_fit(plan, gpu_gib),
               "host": host_bytes(plan), "host_ram_gib": args.host_ram_gib,
               "host_warning": host_warning(plan, args.host_ram_gib)}
        print(json.dumps(out, indent=2))
    else:
        print(report(plan, gpu_gib if plan.device == "cuda" else None, args.host_ram_gib))
        if ignored:
            print(f"(ignored, no effect on memory: {' '.join(a for a in ignored if a.startswith('--'))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

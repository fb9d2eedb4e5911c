"""GPU memory per process for a training configuration, computed from the model configs alone.

    python -m llava_min.memory --llm-config internlm2-7b --vit-config dinov2-large --batch-size 1 \\
        --max-length 2048 --nproc 4 --gpu-mem 24
    python -m llava_min.memory --llm-config internlm2-7b --vit-config dinov2-large --lora-r 128 \\
        --grad-checkpointing --batch-size 1 --json

The flags are finetune.py's (its other flags are accepted and ignored), with its defaults: stage 2
(`--train projector,llm`), batch 16, max length 2048, 336 px, bf16. finetune.py prints this estimate before
the first step, and after a CUDA out-of-memory error prints `suggest_fit`: the flags that would make it fit.

What finetune.py keeps on the GPU, and the bytes this module books for it (P = parameters; "trained" are
the parameters with requires_grad: the projector, the LLM or its LoRA adapters, the ViT if asked):

  weights        trained x 4 (fp32 master weights) + frozen x 2 in bf16 (x 4 in fp32)
  gradients      trained x 4
  DDP buckets    0: train.py builds DDP with gradient_as_bucket_view=True, so gradients live in the flat
                 all-reduce buckets; without it (Plan.ddp_bucket_view=False) another trained x 4
  optimizer      AdamW's exp_avg and exp_avg_sq: trained x 8; with --zero (ZeRO-1, torch's
                 ZeroRedundancyOptimizer) each rank keeps 1 / world_size of it
  autocast       bf16 copies of the trained matrices (autocast casts each fp32 weight once per forward and
                 keeps the copy until backward): 2 x (trained P in matmuls: all but embeddings and norms)
  activations    what autograd saves for backward, below
  logits         the cross-entropy chunk in backward: c x V x (12 + a), c = min(1024, supervised tokens);
                 the loss never builds (B, T, V) logits (llava.LLaVA.loss_sum recomputes each chunk)
  CUDA context   0.75 GiB (context, cuBLAS workspaces), + 0.5 GiB NCCL buffers when world size > 1

Activations, in bytes per token of the LLM sequence (N = batch x max_length, image tokens included), with
a = 2 in bf16 (4 in fp32), r = bytes of the residual stream (4 when the LLM trains in fp32 master weights,
else a), h = hidden, kv = kv_heads x head_dim, i = intermediate, nh = heads, hd = head_dim. Per LLM block:

  LLM trained       norms (4 + r + a) h + (4 + r) h + (a h if r == a else 2 a h) + 8
                    [the fp32 input of each RMSNorm, its normalised output (for the weight's gradient), and
                     the bf16 copy each linear makes of its input: w1 and w3 make one each]
                    attention a (2h + 2kv) + 4 nh + (a hd if r != a)
                    [the rotated q|k buffer (q is a view of it; k and v are copied out so the fused qkv
                     buffer is freed), v, the attention output = wo input, log-sum-exp, and the per-block
                     bf16 rotary tables]
                    MLP 4 a i  [w1 out, w3 out, silu out, their product]
  LLM frozen        norms 2 x (4h + 4); attention as above; MLP 3 a i   [linears save nothing: no weight grad]
  LoRA              LLM frozen + for each adapted linear: d_in x (m + a) + r a, d_in summed = 4h + i
                    [the dropout mask (m = 1 byte on CUDA's fused dropout, a on CPU) and the adapter input]
  padding           batch > 1 on CUDA: the padded-batch attention path repeats k and v to all heads,
                    + 2 a (h - kv), and saves a float mask per block, + a x max_length
  checkpointing     each block keeps only its input (r h), and one block is recomputed at a time in
                    backward: L x r h + one block
  last block        booked in full, an upper bound: train.py's forward(loss_only=True) runs its output
                    projection and MLP on the supervised tokens only (at most 1/L of the blocks' total less)
  outside blocks    16 (ids and splice indices), the final norm (4h + r h + 4, or 4h + 4 frozen), and for
                    each supervised token (at most N - image tokens) the gathered hidden state r h + 24
  projector         per image token a (D_vit + 2 h) when trained
  ViT frozen        runs under no_grad: nothing saved; its transient forward peak n_img x tokens x
                    a (6 D + 2 F) only matters if larger than the rest
  ViT trained       per block and ViT token (1 + registers + patches): norms 2 (r D + 8), linear inputs
                    (3 a D if r != a else a D) + a D, q k v 3 a D, attention output a D + 4 nh, the two
                    layer-scale inputs 2 a D, MLP a 2F (GELU) or a 4F (SwiGLU); blocks run = L + 1 + select_layer;
                    plus the pixels, a x 3 x image_size^2 per image, for the patch convolution

The activation model was checked against measurement: tests/test_memory.py runs a real forward of
LLaVA (InternLM2 + DINOv2 + projector, hidden 256, 2 blocks, 512 tokens) on the CPU and counts the bytes
of every distinct tensor storage autograd saves for backward (torch.autograd.graph.saved_tensors_hooks,
parameters excluded): that is exactly the activation memory held from forward to backward, independent of
the allocator. It agrees within 15% (in practice within 1-2%) in fp32, bf16 autocast, LoRA, frozen-LLM,
checkpointed and trained-ViT set-ups. Not measured on the CPU: CUDA's padded-batch attention path, the
logits chunk and the context, which are modelled from the kernels' documented buffers; bench/ compares
the total with torch.cuda.max_memory_allocated on a GPU.

A card fits a configuration when the total is at most 95% of its memory (the rest is allocator slack).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import dinov2, internlm2

GiB = 2**30
CUDA_CONTEXT = 0.75 * GiB
NCCL_BUFFERS = 0.5 * GiB
FIT_FRACTION = 0.95
LOSS_CHUNK = 1024                       # llava.LLaVA.loss_sum's default
LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")
PARTS = ("projector", "llm", "vit")


@dataclass
class Plan:
    """One training configuration, as finetune.py's flags describe it."""
    llm: internlm2.InternLM2Config
    vit: dinov2.DINOv2Config
    train: tuple[str, ...] = ("projector", "llm")
    lora_r: int = 0
    lora_dropout: float = 0.05
    batch_size: int = 16
    max_length: int = 2048
    image_size: int = 336
    grad_checkpointing: bool = False
    dtype: str = "bfloat16"
    zero: bool = False
    world_size: int = 1
    images_per_sample: int = 1
    select_layer: int = -2
    loss_chunk: int = LOSS_CHUNK
    device: str = "cuda"                # "cpu" only changes the dropout mask size (see the docstring)
    ddp_bucket_view: bool = True        # train.py builds DDP(gradient_as_bucket_view=True): no bucket copy

    @property
    def act_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    @property
    def image_tokens(self) -> int:
        """Patch tokens per image, as the LLM sees them."""
        return (self.image_size // self.vit.patch_size) ** 2

    @property
    def llm_mode(self) -> str:
        if "llm" not in self.train:
            return "frozen"
        return "lora" if self.lora_r else "full"

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
    total: int = 0

    @property
    def saved_activations(self) -> int:
        """What autograd holds from forward to backward (the recompute terms happen inside backward)."""
        return sum(v for k, v in self.activations.items() if "recompute" not in k)

    @property
    def activation_total(self) -> int:
        return sum(self.activations.values())

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["saved_activations"], d["activation_total"] = self.saved_activations, self.activation_total
        return d


# --------------------------------------------------------------------------------------------------
# Parameters

def lora_parameters(c: internlm2.InternLM2Config, r: int) -> int:
    """A (r x in) and B (out x r) for wqkv, wo, w1, w3, w2 in every block."""
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    h, i = c.hidden_size, c.intermediate_size
    in_plus_out = (h + qkv) + (h + h) + 2 * (h + i) + (i + h)
    return c.num_hidden_layers * r * in_plus_out


def vit_blocks_run(plan: Plan) -> int:
    """features(layer=select_layer) runs L + 1 + select_layer blocks (L - 1 for LLaVA's -2)."""
    return plan.vit.num_hidden_layers + 1 + plan.select_layer


def param_counts(plan: Plan) -> dict[str, int]:
    """Tensor counts from the configs alone (the checkpoints' tensors: DINOv2's mask_token buffer included).
    "trained" counts the parameters that get gradients and optimizer state; a trained ViT's blocks after
    select_layer and its final norm never run, so they keep fp32 weights ("unused") but no gradient."""
    c, v = plan.llm, plan.vit
    h, D = c.hidden_size, v.hidden_size
    vit_block = dinov2.num_parameters(v) - dinov2.num_parameters(
        dataclasses.replace(v, num_hidden_layers=v.num_hidden_layers - 1)) if v.num_hidden_layers > 1 else 0
    counts = {"llm": internlm2.num_parameters(c), "vit": dinov2.num_parameters(v),
              "projector": D * h + h + h * h + h,           # Linear(D, h), GELU, Linear(h, h), with biases
              "lora": lora_parameters(c, plan.lora_r) if plan.lora_r else 0}
    vit_unused = (v.num_hidden_layers - vit_blocks_run(plan)) * vit_block + 2 * D
    trained = {"projector": counts["projector"] if "projector" in plan.train else 0,
               "llm": (counts["lora"] if plan.lora_r else counts["llm"]) if "llm" in plan.train else 0,
               "vit": counts["vit"] - vit_unused - D * v.use_mask_token if "vit" in plan.train else 0}
    counts["trained"] = sum(trained.values())
    counts["unused"] = vit_unused if "vit" in plan.train else 0
    counts["frozen"] = (counts["llm"] + counts["vit"] + counts["projector"] + counts["lora"]
                        - counts["trained"] - counts["unused"])
    # The trained parameters that autocast casts to bf16: matrices of linear / conv layers (and their
    # biases), not embeddings, position tables, norms or layer scales.
    llm_matmul = counts["llm"] - c.vocab_size * h - (2 * c.num_hidden_layers + 1) * h
    vit_tables = ((v.grid_size ** 2 + 1) * D + D * (1 + v.use_mask_token + v.num_register_tokens)
                  + vit_blocks_run(plan) * 6 * D)           # positions, cls / mask / registers, norms, scales
    counts["trained_matmul"] = (trained["projector"]
                                + (counts["lora"] if plan.lora_r else llm_matmul) * ("llm" in plan.train)
                                + (trained["vit"] - vit_tables) * ("vit" in plan.train))
    return counts


# --------------------------------------------------------------------------------------------------
# Activations

def llm_block_bytes_per_token(plan: Plan) -> float:
    """Bytes one InternLM2 block saves for backward, per token (module docstring, "Per LLM block")."""
    c, a, mode = plan.llm, plan.act_bytes, plan.llm_mode
    h, i, nh, hd = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim
    kv = c.num_key_value_heads * hd
    r = 4 if mode == "full" else a
    attention = a * (2 * h + 2 * kv) + 4 * nh + (a * hd if r != a else 0)
    if mode == "full":
        norms = (4 + r + a) * h + (4 + r) * h + (a * h if r == a else 2 * a * h) + 8
        mlp = 4 * a * i
    else:
        norms = 2 * (4 * h + 4)
        mlp = 3 * a * i
    total = norms + attention + mlp
    if mode == "lora":
        mask = (1 if plan.device == "cuda" else a) if plan.lora_dropout > 0 else 0
        total += (4 * h + i) * (mask + a) + len(LORA_TARGETS) * plan.lora_r * a
    if plan.batch_size > 1 and plan.device == "cuda":
        total += 2 * a * (h - kv) + a * plan.max_length
    return total


def vit_block_bytes_per_token(plan: Plan) -> float:
    """Bytes one DINOv2 block saves for backward per ViT token, when the ViT trains."""
    v, a = plan.vit, plan.act_bytes
    D, F = v.hidden_size, v.ffn_hidden_size
    r = 4
    norms = 2 * (r * D + 8)
    linear_inputs = (3 * a * D if r != a else a * D) + a * D          # q/k/v inputs, fc1 input
    attention = 3 * a * D + a * D + 4 * v.num_attention_heads          # q, k, v, output (= dense input), lse
    layer_scale = 2 * a * D
    mlp = a * (4 * F if v.use_swiglu_ffn else 2 * F)
    return norms + linear_inputs + attention + layer_scale + mlp


def activation_bytes(plan: Plan) -> dict[str, int]:
    """Itemised activation bytes at the peak (the start of backward)."""
    c, v, a = plan.llm, plan.vit, plan.act_bytes
    h, L = c.hidden_size, c.num_hidden_layers
    B, T = plan.batch_size, plan.max_length
    N = B * T
    n_images = B * plan.images_per_sample
    r = 4 if plan.llm_mode == "full" else a
    block = llm_block_bytes_per_token(plan) * N
    items = {}
    if plan.grad_checkpointing:
        items["llm blocks (inputs kept)"] = L * r * h * N
        items["llm recompute (one block)"] = block
    else:
        items["llm blocks"] = L * block
    supervised = max(0, N - n_images * plan.image_tokens)
    final_norm = (4 * h + r * h + 4) if plan.llm_mode == "full" else (4 * h + 4)
    items["llm outside blocks"] = 16 * N + final_norm * N + (r * h + 24) * supervised
    vit_tokens = n_images * (1 + v.num_register_tokens + plan.image_tokens)
    if "projector" in plan.train:
        items["projector"] = n_images * plan.image_tokens * a * (v.hidden_size + 2 * h)
    if "vit" in plan.train:
        blocks = vit_blocks_run(plan)
        vit_block = vit_block_bytes_per_token(plan) * vit_tokens
        pixels = n_images * 3 * plan.image_size ** 2 * a
        if plan.grad_checkpointing:
            items["vit blocks (inputs kept)"] = blocks * 4 * v.hidden_size * vit_tokens + pixels
            items["vit recompute (one block)"] = vit_block
        else:
            items["vit blocks"] = blocks * vit_block + pixels
    return {k: int(val) for k, val in items.items()}


def vit_transient_bytes(plan: Plan) -> int:
    """Peak of a frozen ViT's no_grad forward (a few live tensors of one block), before the LLM runs."""
    v = plan.vit
    tokens = plan.batch_size * plan.images_per_sample * (1 + v.num_register_tokens + plan.image_tokens)
    return int(tokens * plan.act_bytes * (6 * v.hidden_size + 2 * v.ffn_hidden_size))


def saved_activation_bytes(model, fn):
    """Measure: (bytes, fn()) -- the bytes of the distinct tensor storages autograd saves for backward while
    fn() runs, the model's parameters left out. That is exactly the activation memory held from forward to
    backward, whatever the allocator does. tests/test_memory.py checks the model above against it;
    bench/memory.py compares llava-min with transformers by it."""
    import torch

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


# --------------------------------------------------------------------------------------------------
# The estimate

def estimate(plan: Plan) -> Estimate:
    _check(plan)
    p = param_counts(plan)
    frozen_bytes = 2 if plan.dtype == "bfloat16" else 4
    world = plan.world_size
    optimizer_unsharded = 8 * p["trained"]
    acts = activation_bytes(plan)
    other = activation_bytes(plan.replace(grad_checkpointing=not plan.grad_checkpointing))
    supervised = max(1, plan.batch_size * (plan.max_length - plan.images_per_sample * plan.image_tokens))
    e = Estimate(
        params=p,
        weights=4 * (p["trained"] + p["unused"]) + frozen_bytes * p["frozen"],
        gradients=4 * p["trained"],
        ddp_buckets=4 * p["trained"] if world > 1 and not plan.ddp_bucket_view else 0,
        optimizer=optimizer_unsharded // world if plan.zero and world > 1 else optimizer_unsharded,
        optimizer_unsharded=optimizer_unsharded,
        autocast_copies=2 * p["trained_matmul"] if plan.dtype == "bfloat16" else 0,
        activations=acts,
        activations_other_mode=sum(other.values()),
        vit_transient=vit_transient_bytes(plan) if "vit" not in plan.train else 0,
        logits=int(min(plan.loss_chunk, supervised) * plan.llm.vocab_size * (12 + plan.act_bytes)),
        cuda_context=int(CUDA_CONTEXT + (NCCL_BUFFERS if world > 1 else 0)) if plan.device == "cuda" else 0,
    )
    static = e.weights + e.gradients + e.ddp_buckets + e.optimizer + e.autocast_copies + e.cuda_context
    e.total = static + max(e.activation_total + e.logits, e.vit_transient)
    return e


def _check(plan: Plan) -> None:
    unknown = set(plan.train) - set(PARTS)
    if unknown or not plan.train:
        raise ValueError(f"--train {','.join(plan.train)}: use a comma list of {', '.join(PARTS)}, or all")
    if plan.image_size % plan.vit.patch_size:
        raise ValueError(f"--image-size {plan.image_size} is not a multiple of the ViT patch size "
                         f"{plan.vit.patch_size}")
    need = plan.images_per_sample * plan.image_tokens
    if plan.max_length <= need:
        raise ValueError(f"--max-length {plan.max_length} leaves no room for text after {need} image tokens "
                         f"({plan.image_size} px / {plan.vit.patch_size} px patches)")
    if plan.lora_r and "llm" not in plan.train:
        raise ValueError("--lora-r trains the LLM through adapters: add llm to --train")
    if plan.batch_size < 1 or plan.world_size < 1:
        raise ValueError(f"--batch-size ({plan.batch_size}) and the world size ({plan.world_size}) must be >= 1")


def fits(plan: Plan, gpu_gib: float) -> bool:
    return estimate(plan).total <= FIT_FRACTION * gpu_gib * GiB


def largest_batch(plan: Plan, gpu_gib: float, limit: int = 4096) -> int:
    """The largest micro-batch that fits (0: not even 1)."""
    if not fits(plan.replace(batch_size=1), gpu_gib):
        return 0
    lo, hi = 1, limit
    while lo < hi:                                   # fits(lo), and the answer is in [lo, hi]
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(plan.replace(batch_size=mid), gpu_gib) else (lo, mid - 1)
    return lo


def largest_length(plan: Plan, gpu_gib: float, step: int = 64) -> int:
    """The largest --max-length (a multiple of `step`, at most max_position_embeddings) that fits; 0 if none."""
    floor = (plan.images_per_sample * plan.image_tokens) // step * step + step
    top = plan.llm.max_position_embeddings // step
    if not fits(plan.replace(max_length=floor), gpu_gib):
        return 0
    lo, hi = floor // step, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(plan.replace(max_length=mid * step), gpu_gib) else (lo, mid - 1)
    return lo * step


def suggest_fit(plan: Plan, gpu_gib: float) -> list[str]:
    """Flags that make `plan` fit a card of `gpu_gib` GiB. First a smaller micro-batch (the same global batch
    through --grad-accum); if even batch 1 does not fit, levers are added one by one: bf16, checkpointing,
    ZeRO-1, LoRA, a smaller LoRA rank, and last a shorter --max-length; levers that the final batch and
    length do not need are dropped again. The last line gives the resulting estimate, or says that none of
    this is enough."""
    if fits(plan, gpu_gib):
        return [f"already fits: {estimate(plan).total / GiB:.1f} GiB of {gpu_gib:g} GiB"]
    levers: list[tuple[str, dict]] = []
    if plan.dtype != "bfloat16":
        levers.append(("--dtype bfloat16", {"dtype": "bfloat16"}))
    if not plan.grad_checkpointing:
        levers.append(("--grad-checkpointing", {"grad_checkpointing": True}))
    if plan.world_size > 1 and not plan.zero:
        levers.append(("--zero", {"zero": True}))
    if plan.llm_mode == "full":
        levers.append(("--lora-r 128 (train the LLM through adapters)", {"lora_r": 128}))
    if plan.llm_mode != "frozen" and (plan.lora_r or 128) > 32:
        levers.append(("--lora-r 32", {"lora_r": 32}))

    def build(chosen, **more) -> Plan:
        p = plan
        for _, change in chosen:
            p = p.replace(**change)
        return p.replace(**more)

    applied, batch, length = [], 0, plan.max_length
    for i in range(len(levers) + 1):
        batch = min(largest_batch(build(applied), gpu_gib), plan.batch_size)
        if batch or i == len(levers):
            break
        applied.append(levers[i])
    if not batch:
        batch, length = 1, largest_length(build(applied, batch_size=1), gpu_gib)
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


# --------------------------------------------------------------------------------------------------
# From finetune.py's arguments

def plan_from_args(args, world_size: int | None = None, device: str | None = None) -> Plan:
    """A Plan from an argparse namespace with finetune.py's names (missing ones take the defaults)."""
    def get(name, default=None):
        value = getattr(args, name, None)
        return default if value is None else value

    init = Path(get("init_from")) if get("init_from") else None
    llm_source = get("llm") or get("llm_config") or (init / "llm" if init else None)
    vit_source = get("vit") or get("vit_config") or (init / "vit" if init else None)
    if llm_source is None or vit_source is None:
        raise ValueError("give --llm DIR or --llm-config NAME_OR_JSON, and --vit DIR or --vit-config NAME_OR_JSON "
                         "(or --init-from DIR)")
    image_size = get("image_size")
    if image_size is None and init is not None and (init / "llava_config.json").exists():
        image_size = json.loads((init / "llava_config.json").read_text()).get("image_size")
    train = get("train", "projector,llm")
    parts = PARTS if train == "all" else tuple(p.strip() for p in train.split(",") if p.strip())
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = get("dtype") or ("bfloat16" if device == "cuda" else "float32")
    return Plan(llm=internlm2.load_config(llm_source), vit=dinov2.load_config(vit_source), train=parts,
                lora_r=get("lora_r", 0), lora_dropout=get("lora_dropout", 0.05), batch_size=get("batch_size", 16),
                max_length=get("max_length", 2048), image_size=image_size or 336,
                grad_checkpointing=bool(get("grad_checkpointing", False)), dtype=dtype, zero=bool(get("zero", False)),
                world_size=world_size or get("world_size", 1), device=device)


# --------------------------------------------------------------------------------------------------
# Report

def report(plan: Plan, gpu_gib: float | None = None) -> str:
    e = estimate(plan)
    p, g = e.params, lambda b: f"{b / GiB:8.2f}"
    frozen_b = 2 if plan.dtype == "bfloat16" else 4
    ckpt = "on" if plan.grad_checkpointing else "off"
    world = plan.world_size
    if e.optimizer != e.optimizer_unsharded:
        optimizer_note = f"ZeRO-1 over {world} ranks (unsharded {e.optimizer_unsharded / GiB:.2f})"
    elif world > 1:
        optimizer_note = f"trained x 8 B; with --zero over {world} ranks: {e.optimizer_unsharded / world / GiB:.2f}"
    else:
        optimizer_note = "trained x 8 B"
    lines = [
        f"memory per GPU: {world} process{'es' if world > 1 else ''}{', DDP' if world > 1 else ''}, "
        f"{plan.dtype}{' autocast, fp32 master weights' if plan.dtype == 'bfloat16' else ''}",
        f"  parameters: LLM {p['llm']:,}, ViT {p['vit']:,}, projector {p['projector']:,}"
        + (f", LoRA r={plan.lora_r} {p['lora']:,}" if plan.lora_r else ""),
        f"  trained: {', '.join(plan.train)}{' (LLM through LoRA)' if plan.lora_r else ''} = {p['trained']:,} "
        f"(fp32); frozen {p['frozen']:,} ({plan.dtype})",
        f"  sequence: batch {plan.batch_size} x {plan.max_length} tokens, {plan.image_tokens} image tokens per "
        f"image ({plan.image_size} px); gradient checkpointing {ckpt}",
        "",
        "                                        GiB",
        f"  weights                          {g(e.weights)}   trained x 4 B + frozen x {frozen_b} B",
        f"  gradients                        {g(e.gradients)}   trained x 4 B",
        f"  DDP gradient buckets             {g(e.ddp_buckets)}   "
        + ("trained x 4 B (0 with gradient_as_bucket_view)" if e.ddp_buckets else "none"),
        f"  optimizer (AdamW m, v)           {g(e.optimizer)}   {optimizer_note}",
        f"  autocast bf16 weight copies      {g(e.autocast_copies)}",
        f"  activations                      {g(e.activation_total)}   "
        f"(checkpointing {ckpt}; {'off' if plan.grad_checkpointing else 'on'}: {e.activations_other_mode / GiB:.2f})",
    ]
    lines += [f"    {name:30s} {g(b)}" for name, b in e.activations.items()]
    if e.vit_transient:
        lines.append(f"    {'frozen ViT (no_grad)':30s} {g(0)}   transient peak {e.vit_transient / GiB:.2f}")
    lines += [f"  cross-entropy logits chunk       {g(e.logits)}",
              f"  {'CUDA context + NCCL' if world > 1 else 'CUDA context':31s}  {g(e.cuda_context)}",
              f"  total (peak)                     {g(e.total)}"]
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
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", default=None, help="InternLM2 folder (its config.json is read)")
    p.add_argument("--llm-config", default=None, help="preset (tiny, internlm2-1_8b, internlm2-7b) or config.json")
    p.add_argument("--vit", default=None, help="DINOv2 folder (its config.json is read)")
    p.add_argument("--vit-config", default=None, help="preset (dinov2-small/-base/-large/-giant[-reg]) or config.json")
    p.add_argument("--init-from", default=None, help="a folder written by train.py: its llm/ and vit/ configs")
    p.add_argument("--train", default="projector,llm", help="comma list of projector,llm,vit, or all")
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch per process")
    p.add_argument("--max-length", type=int, default=2048, help="LLM sequence, image tokens included")
    p.add_argument("--image-size", type=int, default=None, help="square ViT input (default 336)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--zero", action="store_true", help="ZeRO-1: shard the optimizer state over the ranks")
    p.add_argument("--world-size", "--nproc", dest="world_size", type=int,
                   default=int(os.environ.get("WORLD_SIZE", 1)), help="processes (GPUs) in the job")
    p.add_argument("--gpu-mem", type=float, default=None,
                   help="GiB per GPU for the fit search (default: this machine's GPU, else 24)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args, ignored = p.parse_known_args(argv)
    try:
        plan = plan_from_args(args, world_size=args.world_size, device="cuda")
    except ValueError as e:
        p.error(str(e))
    gpu_gib = args.gpu_mem
    if gpu_gib is None:
        import torch
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / GiB if torch.cuda.is_available() else 24.0
    if args.json:
        e = estimate(plan)
        out = {"plan": dict(dataclasses.asdict(plan), llm=plan.llm.to_dict(), vit=plan.vit.to_dict()),
               "estimate": e.as_dict(), "gib": {k: round(v / GiB, 3) for k, v in e.as_dict().items()
                                                if isinstance(v, int) and k != "params"},
               "gpu_gib": gpu_gib, "fits": fits(plan, gpu_gib), "largest_batch": largest_batch(plan, gpu_gib),
               "largest_max_length": largest_length(plan, gpu_gib), "suggest_fit": suggest_fit(plan, gpu_gib)}
        print(json.dumps(out, indent=2))
    else:
        print(report(plan, gpu_gib))
        if ignored:
            print(f"(ignored, no effect on memory: {' '.join(a for a in ignored if a.startswith('--'))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

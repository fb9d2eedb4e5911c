"""Sharded training for `train.py --fsdp`: PyTorch's FSDP2 (`fully_shard`) and distributed
checkpoints (DCP). llava_min/parallel.py calls these for the training loop.

    model = build(on=fsdp.load_device(d))       # rank 0: the weights (on CPU); others: meta
    fsdp.shard(model, d, compute_dtype)         # after freezing / LoRA, before the optimizer
    model.set_requires_gradient_sync(last)      # reduce-scatter on the last micro-step only
    fsdp.clip_gradients(model, 1.0, d, step)    # the global norm over every rank's shards
    fsdp.save_sharded(model, optimizer, out, step, state, keep, d)   # every rank its shards
    fsdp.load_sharded(model, optimizer, ckpt, d)    # into any world size, sharded or not
    plain = fsdp.consolidated(model, parts, d)  # rank 0: an unsharded LLaVA for the output

Each InternLM2 decoder layer (and ViT block, when the ViT trains) is one unit: split in dim 0 over
the ranks, all-gathered for its forward and backward, its gradients reduce-scattered after. The
root unit (embeddings, norm, head, projector) stays gathered; a frozen ViT is whole on every rank.
Parameter names do not change (FSDP2 swaps tensors, not modules): checkpoints use the same names
with and without sharding.
"""
from __future__ import annotations

import resource
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from . import checkpoint, dist, weights
from .internlm2 import InternLM2
from .llava import PARTS, LLaVA
from .lora import LoRALinear, apply_lora
from .projector import Projector

# The DCP folder inside a checkpoint: one file per rank that saved, plus .metadata.
SHARDS = "shards"
# Trained tensors only: the frozen ones are rebuilt from their sources on resume, as without
# sharding.
TRAINED = StateDictOptions(ignore_frozen_params=True)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def load_device(d: "dist.Dist") -> torch.device:
    # Rank 0 on the CPU (a loaded tensor stays a view of its memory-mapped file), the others on
    # meta (no storage).
    if d.rank == 0:
        return torch.device("cpu")
    return torch.device("meta")


def shard(model: LLaVA, d: "dist.Dist", compute_dtype: torch.dtype) -> None:
    """Turn `model` (built where `load_device` says) into FSDP2 units on d.device, in place,
    holding rank 0's weights: each rank allocates its 1/world_size of every unit, then rank 0
    broadcasts the tensors one by one and each rank copies its slice; no device ever holds the
    whole model. A collective: every rank calls it."""
    built_on = {str(t.device) for t in model.state_dict().values()}
    # Rank 0's whole tensors (the state dict holds them), then its module goes to meta like the
    # others': every rank shards and allocates the same way, and rank 0's device never holds a
    # whole unit either.
    full = {}
    if d.rank == 0:
        full = model.state_dict()
    model.to("meta")
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    # bf16 all-gathers and compute, fp32 gradient reduce-scatters (in fp32 FSDP casts nothing); the
    # shards stay in their dtype, so the optimizer updates fp32 master weights.
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layers = model.llm.layers
    for i, layer in enumerate(layers):
        # The last layer's backward comes right after its forward: keeping it gathered saves one all-gather.
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    vit_trains = any(p.requires_grad for p in model.vit.parameters())
    if vit_trains:
        for block in model.vit.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    # The root: everything not in a unit above (the LLaVA forward is what runs, so its hooks gather these first).
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=None if vit_trains else set(model.vit.parameters()))
    # This rank's shards, the ignored ViT and the buffers: allocated, not filled.
    model.to_empty(device=d.device)
    with dist.collective(d, "loading: rank 0 broadcasts the weights into every rank's shards"):
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)
        # Rank 0's generator drew the fresh weights; the others drew nothing on meta. Every rank
        # continues from rank 0's stream, as when every rank built the whole model (dropout masks
        # as under DDP).
        states = dist.all_gather_object(d, torch.get_rng_state(), what="rank 0's RNG state")
        torch.set_rng_state(states[0])
    del full
    held = sum(_local(t).numel() * t.element_size() for t in model.state_dict().values())
    whole = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if d.device.type == "cuda":
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB"
    else:
        # ru_maxrss is in KiB.
        peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    d.log(f"FSDP load: built on {', '.join(sorted(built_on))}; holds {held:,} of the model's "
          f"{whole:,} bytes; {peak}")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor; a plain tensor as it is."""
    if isinstance(t, DTensor):
        return t.to_local()
    return t


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor all-gathered (a collective); a plain tensor as it is."""
    if isinstance(t, DTensor):
        return t.full_tensor()
    return t


@torch.no_grad()
def clip_gradients(model: torch.nn.Module, max_norm: float | None, d: "dist.Dist",
                   step: int) -> float:
    """Scale the (sharded) gradients so that their global L2 norm is at most max_norm; returns
    the norm before. Each rank's norm covers its shards only: one all-reduce makes it the norm
    of the whole model."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    with dist.collective(d, f"gradient norm (all-reduce over the FSDP shards) at step {step}"):
        norm = _whole(norm)
    if max_norm and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


# Checkpoints: every rank writes its own shards

def save_sharded(model: torch.nn.Module, optimizer, out: Path, step: int, state: dict,
                 keep: int | None, d: "dist.Dist") -> None:
    """OUT/checkpoints/step-N with SHARDS/ (trained tensors and AdamW state, one file per rank)
    and `state` in training_state.pt. Rank 0 publishes the .tmp- folder after DCP's closing
    collective, i.e. once every rank's file is complete. A collective: every rank calls it."""
    tmp = None
    if d.rank == 0:
        tmp = checkpoint.begin_checkpoint(out, step)
    # Every rank writes into rank 0's folder.
    folders = dist.all_gather_object(d, str(tmp), what=f"the folder of the checkpoint at step {step}")
    tmp = Path(folders[0])
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
    with dist.collective(d, f"writing the sharded checkpoint at step {step} (DCP, every rank)"):
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / SHARDS,
                 process_group=d.cpu_group)
    if d.rank == 0:
        checkpoint.publish_checkpoint(out, step, tmp, dict(state, sharded=SHARDS), keep=keep)


def load_sharded(model: torch.nn.Module, optimizer, ckpt: Path, d: "dist.Dist") -> None:
    """Resume from `save_sharded`'s checkpoint under any world size, sharded or not: DCP reads
    for each rank the pieces of the saved shards that make up what it holds now (whole tensors
    without FSDP)."""
    saved_keys = dcp.FileSystemReader(ckpt / SHARDS).read_metadata().state_dict_metadata
    saved = {k.removeprefix("model.") for k in saved_keys if k.startswith("model.")}
    checkpoint.check_trained(saved - {n for n, _ in model.named_buffers()}, model, ckpt)
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
    group = None
    if d.is_distributed:
        group = d.cpu_group
    what = f"reading the sharded checkpoint {ckpt} (DCP)"
    with warnings.catch_warnings(), dist.collective(d, what):
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=ckpt / SHARDS,
                 process_group=group)
    # Not strict: the frozen tensors are absent on purpose (the trained ones were checked above).
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


# The final output: whole tensors, once

def _unsharded_like(part: str, module: torch.nn.Module) -> torch.nn.Module:
    """An empty (meta) module of the same class, config and LoRA layers as `module`, frozen where it is."""
    clone = weights.build_on_meta({"llm": lambda: InternLM2(module.config), "vit": lambda: type(module)(module.config),
                          "projector": lambda: Projector(module.vision_hidden, module.llm_hidden, module.depth,
                                                         module.bias)}[part])
    lora = {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}
    if lora:
        first = next(iter(lora.values()))
        apply_lora(clone, r=first.r, alpha=first.alpha, dropout=0.0, targets=list(lora))
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    for n, p in clone.named_parameters():
        p.requires_grad_(n not in frozen)
    return clone


def consolidated(model: LLaVA, needed: set[str], d: "dist.Dist") -> LLaVA | None:
    """Rank 0: an unsharded LLaVA for write_output, the parts in `needed` whole on the CPU in
    their training dtypes, the others the model's own modules (write_output links those from
    their sources); other ranks: None. Each sharded tensor is all-gathered in turn: a
    collective, every rank calls it."""
    parts = {}
    for part in PARTS:
        module = getattr(model, part)
        if part not in needed:
            parts[part] = module
            continue
        full = {}
        what = f"gathering the whole {part} on rank 0 for the output (FSDP all-gather)"
        with dist.collective(d, what):
            for name, t in module.state_dict().items():
                # An all-gather of this tensor's shards.
                t = _whole(t)
                if d.rank == 0:
                    full[name] = t.detach().cpu()
        if d.rank == 0:
            parts[part] = _unsharded_like(part, module)
            parts[part].load_state_dict(full, strict=True, assign=True)
    if d.rank != 0:
        return None
    return LLaVA(parts["llm"], parts["vit"], parts["projector"], model.config)

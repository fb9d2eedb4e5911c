"""How the trained weights are spread over the ranks, behind the few verbs the training loop needs.

    par = Parallel(model, d, want_fsdp=args.fsdp, want_zero=args.zero, compute_dtype=dtype)
    optimizer = par.make_optimizer(groups, lr)     # AdamW; its state sharded under ZeRO-1, FSDP
    with par.sync(last_micro_step, where):         # one micro-batch's forward and backward
        loss.backward()
    norm = par.clip(max_norm, step)                # the global gradient norm; then clipped
    par.step(step)                                 # the optimizer step; gradients dropped
    par.save_checkpoint(out, step, state, keep)    # trained tensors and optimizer state
    par.load_checkpoint(ckpt, state)               # either layout, into this one
    whole = par.consolidated(parts)                # rank 0: the model with whole tensors

Build it after freezing and LoRA, before the optimizer. Four layouts, one `mode`:
    "single"  one process: nothing to spread.
    "ddp"     DistributedDataParallel: every rank holds everything; gradients all-reduced on the
              last micro-step.
    "zero"    DDP with ZeRO-1: the AdamW state sharded over the ranks (ZeroRedundancyOptimizer).
    "fsdp"    FSDP2 `fully_shard`: parameters, gradients and AdamW state sharded (fsdp.py).
Every collective runs inside `dist.collective`, so a timeout names it.
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, dist, fsdp, optim


class Parallel:
    """The model as the loop runs it (`module`), its optimizer, and how both are spread over the
    ranks."""

    def __init__(self, model: torch.nn.Module, d: "dist.Dist", want_fsdp: bool = False,
                 want_zero: bool = False, compute_dtype: torch.dtype = torch.float32):
        self.model = model
        self.d = d
        self.optimizer = None
        self.mode = "single"
        if d.world_size > 1 and want_fsdp:
            self.mode = "fsdp"
        elif d.world_size > 1 and want_zero:
            self.mode = "zero"
        elif d.world_size > 1:
            self.mode = "ddp"
        self.module = model
        if self.mode == "fsdp":
            self._shard(compute_dtype)
        elif self.mode in ("ddp", "zero"):
            self._replicate()

    def _shard(self, compute_dtype: torch.dtype) -> None:
        # Before the optimizer, which then holds fp32 state for this rank's shards only.
        with dist.collective(self.d, "FSDP set-up (device mesh)"):
            fsdp.shard(self.model, self.d, compute_dtype)

    def _replicate(self) -> None:
        # DDP's constructor is a collective (shapes compared, rank 0's weights broadcast).
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, not beside them.
        # No buffer sync in forward: the only buffer (the ViT's mask token) never changes; the
        # default would broadcast it in every forward, one more collective per step, outside any
        # name. torch 2.13 calls this forward_sync_buffers (broadcast_buffers warns on every rank).
        no_buffer_sync = {"forward_sync_buffers": False}
        if "forward_sync_buffers" not in inspect.signature(DDP).parameters:
            no_buffer_sync = {"broadcast_buffers": False}
        device_ids = None
        if self.d.device.type == "cuda":
            device_ids = [self.d.device.index]
        with dist.collective(self.d, "DDP set-up (parameter check and broadcast from rank 0)"):
            self.module = DDP(self.model, device_ids=device_ids, gradient_as_bucket_view=True,
                              **no_buffer_sync)

    @property
    def sharded(self) -> bool:
        """Whether the parameters are sharded (FSDP): checkpoints and the output then gather or
        split them."""
        return self.mode == "fsdp"

    def make_optimizer(self, groups, lr: float) -> torch.optim.Optimizer:
        """AdamW over `groups` (optim.param_groups); under ZeRO-1 each rank keeps the state of
        its share."""
        self.optimizer = optim.make_optimizer(groups, lr, zero=self.mode == "zero")
        return self.optimizer

    @contextlib.contextmanager
    def sync(self, last: bool, where: str):
        """One micro-batch's forward and backward. Gradients are reduced across the ranks on the
        last micro-step only (DDP's no_sync on the others; FSDP keeps them unsharded until then
        and reduce-scatters once). A block that holds a collective runs inside one named
        `dist.collective`."""
        if self.mode == "fsdp":
            # FSDP also all-gathers each unit in forward and backward: collectives on every
            # micro-step.
            self.module.set_requires_gradient_sync(last)
            what = f"forward/backward (FSDP all-gather / reduce-scatter) {where}"
            with dist.collective(self.d, what):
                yield
        elif self.mode == "single":
            yield
        elif not last:
            with self.module.no_sync():
                yield
        else:
            with dist.collective(self.d, f"forward/backward (DDP gradient all-reduce) {where}"):
                yield

    def clip(self, max_norm: float | None, step: int) -> float:
        """The L2 norm of the whole model's gradients (non-finite as it is); clipped to max_norm
        if it is set. The same number on every rank: the gradients are all-reduced (DDP), or
        their norms are (FSDP)."""
        if self.sharded:
            return fsdp.clip_gradients(self.model, max_norm, self.d, step)
        return optim.clip_gradients(self.model.parameters(), max_norm)

    def step(self, step: int) -> None:
        """The optimizer step, then the gradients dropped. Under ZeRO each rank updates its
        shard and broadcasts it: a collective, named if it times out."""
        if self.mode == "zero":
            with dist.collective(self.d, f"optimizer step {step} (ZeRO shard broadcast)"):
                self.optimizer.step()
        else:
            self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save_checkpoint(self, out: Path, step: int, state: dict, keep: int | None) -> None:
        """OUT/checkpoints/step-N with `state`, the trained tensors and the optimizer state. A
        collective: under FSDP every rank writes its shards; else rank 0 writes all (gathering
        ZeRO's shards first)."""
        if self.sharded:
            fsdp.save_sharded(self.model, self.optimizer, out, step, state, keep=keep, d=self.d)
            return
        what = f"gathering the ZeRO optimizer shards on rank 0 for the checkpoint at step {step}"
        with dist.collective(self.d, what):
            optimizer_state = optim.gather_optimizer_state(self.optimizer)
        if self.d.rank == 0:
            trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            trainable = {n: p.detach().cpu() for n, p in trained}
            state = dict(state, optimizer=optimizer_state, trainable=trainable)
            checkpoint.save_checkpoint(out, step, state, keep=keep)

    def load_checkpoint(self, ckpt: Path, state: dict) -> None:
        """The trained tensors and optimizer state of `ckpt` (its training_state is `state`)
        into this layout. A checkpoint saved under --fsdp resumes in any layout but ZeRO's; one
        saved without it, unsharded only."""
        if "sharded" in state:
            if self.mode == "zero":
                raise SystemExit(f"{ckpt} was saved under --fsdp: resume with --fsdp, or without "
                                 "--zero")
            fsdp.load_sharded(self.model, self.optimizer, ckpt, self.d)
            return
        if self.sharded:
            raise SystemExit(f"{ckpt} was saved without --fsdp: resume it without --fsdp (a "
                             "checkpoint saved with --fsdp resumes with or without it)")
        checkpoint.check_trained(set(state["trainable"]), self.model, ckpt)
        # Not strict: the frozen tensors come from their sources.
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])

    def consolidated(self, parts: set[str]):
        """Rank 0: the model with the `parts` whole (gathered under FSDP); other ranks: None, or
        the model. A collective under FSDP: every rank calls it."""
        if self.sharded:
            return fsdp.consolidated(self.model, parts, self.d)
        return self.model

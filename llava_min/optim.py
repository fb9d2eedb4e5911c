"""AdamW with parameter groups, the warm-up + cosine learning rate, and gradient clipping.

Settings follow XTuner's LLaVA-InternLM2 configs and LLaVA-1.5: AdamW with betas (0.9, 0.999),
weight decay 0, clipping at norm 1, a linear warm-up over the first 3% of the steps from 1e-5 x the
peak (mmengine `LinearLR(start_factor=1e-5)`), then a cosine to 0 (`CosineAnnealingLR(eta_min=0)`).
The schedule is a pure function of the step (`lr_at`), so a resumed run sets exactly the learning
rates of the uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from . import LlavaMinError


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 projector_lr: float | None = None) -> list[dict]:
    """The trainable parameters of `model` as AdamW groups named like "projector/no_decay":
    decay / no decay, and with `projector_lr` the projector's apart at that learning rate
    (LLaVA's `mm_projector_lr`)."""
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "model"
        if projector_lr is not None and name.startswith("projector."):
            part = "projector"
        # Weight decay on matrices only: never on norms, biases, or any other 1-D tensor (scales,
        # layer scales).
        buckets.setdefault((part, p.ndim >= 2), []).append(p)
    if not buckets:
        raise LlavaMinError(f"{type(model).__name__} has no trainable parameter; check --train (and "
                            "that the parts it names were unfrozen before building the optimizer)")
    groups = []
    for part in ("model", "projector"):
        for decay in (True, False):
            params = buckets.get((part, decay))
            if not params:
                continue
            group = {"params": params, "name": f"{part}/decay", "lr": lr, "weight_decay": weight_decay}
            if part == "projector":
                group["lr"] = projector_lr
            if not decay:
                group["name"] = f"{part}/no_decay"
                group["weight_decay"] = 0.0
            groups.append(group)
    return groups


def make_optimizer(groups: list[dict] | Iterable[torch.Tensor], lr: float,
                   zero: bool = False) -> torch.optim.Optimizer:
    """AdamW over `groups` (from `param_groups`), the fused kernel when every parameter is on a
    GPU. zero=True shards its state across the ranks (ZeRO-1, ZeroRedundancyOptimizer) when
    torch.distributed is initialised; save it with `gather_optimizer_state` then."""
    groups = list(groups)
    params = []
    for g in groups:
        if isinstance(g, dict):
            params += list(g["params"])
        else:
            params.append(g)
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    options = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused,
                   foreach=not fused)
    if zero and dist.is_available() and dist.is_initialized():
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **options)
    return torch.optim.AdamW(groups, **options)


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's full state dict for a checkpoint. Under ZeRO a collective: the shards are
    gathered on rank 0, which gets the dict (loadable on any number of ranks); the others get
    None."""
    if not (dist.is_available() and dist.is_initialized()):
        return optimizer.state_dict()
    # A 2 s import: only when distributed.
    from torch.distributed.optim import ZeroRedundancyOptimizer
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        if dist.get_rank() != 0:
            return None
        return optimizer.state_dict()
    return optimizer.state_dict()


@torch.no_grad()
def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Scale gradients to a global L2 norm of at most max_norm (None or <= 0: only measure);
    returns the norm before clipping, a non-finite one as is, so the caller can stop or skip the
    step naming the batch."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    limit = math.inf
    if max_norm and max_norm > 0:
        limit = max_norm
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


def lr_at(step: int, max_steps: int, peak: float, warmup_ratio: float = 0.03,
          min_ratio: float = 0.0, start_factor: float = 1e-5) -> float:
    """Learning rate of optimizer step `step` (0-based) of `max_steps`: linear from start_factor
    x peak at step 0 to the peak at step W = ceil(warmup_ratio x max_steps), then a half cosine
    to min_ratio x peak at max_steps."""
    if max_steps < 1 or step < 0:
        raise LlavaMinError(f"learning rate asked for step {step} of a run of {max_steps} steps; "
                            "max_steps must be >= 1 and the step >= 0")
    if not 0 <= warmup_ratio < 1 or not 0 <= min_ratio <= 1:
        raise LlavaMinError(f"warmup_ratio must be in [0, 1) and min_ratio in [0, 1], "
                            f"got {warmup_ratio} and {min_ratio}")
    warmup = math.ceil(warmup_ratio * max_steps)   # rounded up, as transformers' Trainer does
    if step < warmup:
        return peak * (start_factor + (1.0 - start_factor) * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class CosineSchedule:
    """Sets each group's learning rate from `lr_at` after each `optimizer.step()`; its state is
    the step count. Each group's peak is its "initial_lr" (from its "lr" when first seen; saved
    with the optimizer's state)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int,
                 warmup_ratio: float = 0.03):
        self.optimizer = optimizer
        self.max_steps = max_steps
        self.warmup_ratio = warmup_ratio
        self.step_count = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            peak = group["initial_lr"]
            group["lr"] = lr_at(self.step_count, self.max_steps, peak, self.warmup_ratio)

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses, in the first group (the LLM's, or the
        projector's)."""
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self._apply()

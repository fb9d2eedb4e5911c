"""LoRA: low-rank adapters on the LLM's linear layers (Hu et al. 2021, arXiv:2106.09685), as PEFT
builds them.

y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        W: (out, in) frozen, A: (r, in), B: (out,
r) trained

Start at `apply_lora`; saved models hold the adapters merged, training checkpoints the adapters
alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import LlavaMinError

LORA_KEYS = ("lora_A", "lora_B")
# alpha = 2 r unless given: LLaVA-1.5's scale (r 128, alpha 256).
ALPHA_PER_RANK = 2


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update, (alpha / r) * B A."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        # The base tensors themselves (no copy), frozen, under their names: the state dict only
        # gains *.lora_A / B.
        self.weight = base.weight.requires_grad_(False)
        self.bias = None
        if base.bias is not None:
            self.bias = base.bias.requires_grad_(False)
        # fp32 adapters whatever the base dtype, so that AdamW updates small values exactly. A
        # starts as nn.Linear's default, B at zero: the adapted layer equals the base at init
        # (PEFT's `reset_lora_parameters`). A is drawn on the CPU whatever the device: the same
        # starting adapters on CPU and GPU, sharded or not.
        device = base.weight.device
        lora_a = nn.init.kaiming_uniform_(torch.empty(r, self.in_features, device="cpu"), a=math.sqrt(5))
        self.lora_A = nn.Parameter(lora_a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        # On A's input only, as PEFT
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        # The adapter runs in the adapters' dtype (fp32) unless autocast picks bf16 for both
        # matmuls.
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        # (..., in) -> (..., r) -> (..., out)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B)
        return y + (self.scaling * update).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, computed in fp32 and returned in the base weight's dtype (one
        rounding)."""
        delta = self.lora_B.float() @ self.lora_A.float()  # (out, r) @ (r, in) -> (out, in)
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)


def apply_lora(module: nn.Module, r: int, alpha: float | None = None, dropout: float = 0.05,
               targets: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Replace every nn.Linear whose name ends with one of `targets` (default: the LLM's own
    `lora_targets`) by a LoRALinear, in place, and freeze all else. Returns the replaced names.
    alpha defaults to ALPHA_PER_RANK * r; XTuner's InternLM2-7B QLoRA uses r 512, alpha 256: pass
    alpha to match it."""
    if type(r) is not int or r < 1:
        raise LlavaMinError(f"LoRA rank must be a positive integer, got r={r!r} (e.g. --lora-r 64)")
    if alpha is None:
        alpha = ALPHA_PER_RANK * r
    if targets is None and not hasattr(module, "lora_targets"):
        raise LlavaMinError(f"{type(module).__name__} names no lora_targets; pass targets=(...) with "
                            "the names of the linear layers to adapt")
    if targets is None:
        targets = module.lora_targets
    if alpha <= 0 or not 0 <= dropout < 1:
        raise LlavaMinError(f"LoRA needs alpha > 0 and 0 <= dropout < 1, got alpha={alpha}, "
                            f"dropout={dropout}")
    refused = [t for t in targets if t.split(".")[-1] == "output"]
    if refused:
        raise LlavaMinError(f"LoRA targets {refused} name the output head 'output', which never gets an "
                            "adapter; choose among the block layers")
    chosen = [(name, m) for name, m in module.named_modules()
              if any(name == t or name.endswith("." + t) for t in targets)]
    for name, m in chosen:
        if isinstance(m, LoRALinear):
            raise LlavaMinError(f"{name} already has a LoRA adapter; apply_lora was called twice")
        if not isinstance(m, nn.Linear):
            raise LlavaMinError(f"{name} matches a LoRA target but is a {type(m).__name__}, not nn.Linear; "
                                f"narrow the targets {list(targets)}")
    if not chosen:
        some = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)][:8]
        raise LlavaMinError(f"no nn.Linear in {type(module).__name__} ends with any of {list(targets)}; "
                            f"linear layers here are named like {some}")
    module.requires_grad_(False)
    for name, m in chosen:
        module.set_submodule(name, LoRALinear(m, r, alpha, dropout))
    return [name for name, _ in chosen]


def _lora_layers(module: nn.Module) -> list[tuple[str, str, LoRALinear]]:
    """(name, state-dict prefix, layer) of every LoRALinear in module."""
    layers = []
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            # the root module itself has the empty name and no prefix
            prefix = f"{name}." if name else ""
            layers.append((name, prefix, m))
    return layers


def merge_lora(module: nn.Module) -> list[str]:
    """Fold every adapter into its base weight, in place: plain frozen nn.Linear layers again;
    returns their names."""
    if isinstance(module, LoRALinear):
        raise LlavaMinError("merge_lora needs the model that holds the LoRALinear layers, not a layer itself")
    layers = _lora_layers(module)
    for name, _, m in layers:
        # No init
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        if m.bias is not None:
            linear.bias = nn.Parameter(m.bias.detach(), requires_grad=False)
        module.set_submodule(name, linear)
    return [name for name, _, _ in layers]


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every adapter folded in; the module is unchanged (training goes
    on after a save)."""
    state = module.state_dict()
    for _, prefix, m in _lora_layers(module):
        state[prefix + "weight"] = m.merged_weight()
        for k in LORA_KEYS:
            del state[prefix + k]
    return state


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone ({'model.layers.0.attention.wqkv.lora_A': ...}), for training
    checkpoints."""
    return {prefix + k: getattr(m, k).detach() for _, prefix, m in _lora_layers(module) for k in LORA_KEYS}


@torch.no_grad()
def load_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors saved by `lora_state_dict` into a model prepared with the same
    `apply_lora`."""
    own = lora_state_dict(module)       # detached, but the parameters' own storage
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise LlavaMinError(f"LoRA adapters do not match the model: missing {missing[:4]} "
                            f"({len(missing)} in all), unexpected {unexpected[:4]} "
                            f"({len(unexpected)} in all); resume with the same "
                            "--lora-r and target modules as the run that saved them")
    for key, t in state.items():
        if t.shape != own[key].shape:
            raise LlavaMinError(f"LoRA tensor {key!r} has shape {tuple(t.shape)} but the model's is "
                                f"{tuple(own[key].shape)}; the saved run used another rank (--lora-r)")
        own[key].copy_(t)

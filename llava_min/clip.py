"""CLIP's vision tower, as LLaVA-1.5 and XTuner use it: openai/clip-vit-large-patch14-336. Start at
`CLIP`.

transformers' `CLIPVisionModel` in plain PyTorch (matched to 1e-4 by tests/test_clip.py), its
modules named like the keys of a vision-only save. Hidden states are [CLS, N patches], patches
row-major; LLaVA reads hidden state -2 without the CLS token. What sets CLIP apart from DINOv2: a
LayerNorm before the first block (`pre_layrnorm`, the hub's spelling), quick-GELU, a bias-free
patch convolution and a learned position table (`nn.Embedding`). References: Radford et al. 2021;
transformers `models/clip/modeling_clip.py`.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import LlavaMinError, weights
from .dinov2 import check_layer
from .image import Preprocessing, check_image_size

# Checkpoint key -> module key. The hub ships the whole CLIP model (vision_model.*, text_model.*,
# the two projections and logit_scale); transformers 5 saves a CLIPVisionModel without the
# "vision_model." prefix.
KEY_MAP = [(r"^vision_model\.", "")]
# What a full CLIP checkpoint holds besides the vision tower; `from_pretrained` names what it left
# unread.
IGNORE = [r"^text_model\.", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$", r"position_ids$"]

# OpenAI's image statistics; the processor resizes the shortest edge (bicubic) and crops the centre
# square.
PREPROCESSING = Preprocessing(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                              crop_ratio=1.0)


@dataclass
class CLIPConfig:
    """The fields of a CLIPVisionConfig (config.json, or a full model's "vision_config") that shape
    the tower."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int = 32
    # The position table covers (image_size // patch_size) ** 2 patches + CLS
    image_size: int = 224
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3
    # Of the full model's visual projection; kept for the saved config only
    projection_dim: int = 512
    initializer_range: float = 0.02

    def __post_init__(self):
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def ffn_hidden_size(self) -> int:
        return self.intermediate_size

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches: CLS."""
        return 1

    @property
    def preprocessing(self) -> Preprocessing:
        return PREPROCESSING

    def image_tokens(self, image_size: int) -> int:
        """Patch tokens (= LLM positions) of one square image_size x image_size input."""
        return (image_size // self.patch_size) ** 2

    def blocks_run(self, layer: int) -> int:
        """Blocks `features(layer=...)` runs: hidden state `layer` (-2: the penultimate block's
        output)."""
        return layer % (self.num_hidden_layers + 1)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        return cls(**_fields_of(dict(d)))

    def to_dict(self) -> dict:
        """The config.json of a vision-only save, which transformers' CLIPVisionModel reads."""
        return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **dataclasses.asdict(self)}


# The network

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's GELU approximation, x * sigmoid(1.702 x) (transformers' QuickGELUActivation)."""
    return x * torch.sigmoid(1.702 * x)


# transformers' ACT2FN entries that a CLIP or SigLIP config may name ("gelu" is the exact erf
# form).
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_new": partial(F.gelu, approximate="tanh"),
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class Embeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        D = config.hidden_size
        self.config = config
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(config.num_channels, D, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.grid_size ** 2 + 1, D)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings (1, 1 + N, D) for a height x width image; resized as transformers'
        `interpolate_pos_encoding` does (bicubic to the target grid, no antialiasing) when the grid
        differs."""
        table = self.position_embedding.weight[None]                        # (1, 1 + side^2, D)
        side = self.config.grid_size
        rows = height // self.config.patch_size
        cols = width // self.config.patch_size
        if rows == cols == side:
            return table
        grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)   # (1, D, side, side)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)         # (1, N, D)
        return torch.cat([table[:, :1], grid], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        check_image_size(H, W, self.config.patch_size)
        conv = self.patch_embedding
        # (B, D, H/p, W/p) -> (B, N, D)
        x = conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1)                                      # (B, 1 + N, D)
        return x + self.positions(H, W)


class Attention(nn.Module):
    """Bidirectional multi-head attention with q_proj / k_proj / v_proj / out_proj (CLIP's and
    SigLIP's names)."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # each (B, T, D) -> (B, heads, T, head_dim)
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        # No mask: every token sees every token
        y = F.scaled_dot_product_attention(q, k, v)
        # (B, T, heads * head_dim)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm encoder layer (CLIPEncoderLayer; SigLIP's is the same)."""

    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIP(nn.Module):
    """forward -> the last block's tokens (transformers' last_hidden_state, not normed);
    hidden_states -> every state; features -> LLaVA's input. `post_layernorm` normalises CLIP's
    pooled CLS only; it is kept for saving."""

    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))})
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms (transformers scales a few
        by depth)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        nn.init.normal_(self.embeddings.class_embedding, std=self.config.hidden_size ** -0.5)

    @staticmethod
    def load_config(name_or_path) -> CLIPConfig:
        return load_config(name_or_path)

    @staticmethod
    def presets() -> dict[str, CLIPConfig]:
        return PRESETS

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> "CLIP":
        """A hub folder (a vision-only save, or the full CLIP model: its vision tower), in eval
        mode: built on meta, each tensor read once, memory-mapped, to `device` in `dtype`. Says
        what a full checkpoint left unread."""
        config = load_config(Path(path))
        model = weights.build_on_meta(lambda: cls(config))
        unread = weights.load_into(model, path, key_map=KEY_MAP, ignore=IGNORE, dtype=dtype, device=device)
        if unread:
            print(f"{path}: read the CLIP vision tower; left unread: {weights.summarise_keys(unread)}",
                  file=sys.stderr, flush=True)
        return model.eval()

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
        """A vision-only save (CLIPVisionModel's keys and config.json), cast to `dtype` on the
        way."""
        weights.save_state(self.state_dict(), path, dtype=dtype, max_shard_bytes=max_shard_bytes)
        dtype = str(dtype or self.post_layernorm.weight.dtype).removeprefix("torch.")
        weights.write_json(self.config.to_dict() | {"torch_dtype": dtype}, Path(path) / weights.CONFIG_FILE)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks in order: the units of checkpointing, FSDP, FLOP and memory
        counts."""
        return self.encoder.layers

    def freeze_unused(self, layer: int) -> None:
        """Freeze what `features(layer=...)` never runs (later blocks, the final norm): no gradient
        reaches it."""
        for block in self.blocks[self.config.blocks_run(layer):]:
            block.requires_grad_(False)
        self.post_layernorm.requires_grad_(False)

    def set_gradient_checkpointing(self, flag: bool) -> None:
        self.gradient_checkpointing = bool(flag)

    def _run(self, x: torch.Tensor, blocks) -> torch.Tensor:
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in blocks:
            if recompute:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """num_layers + 1 tensors (B, 1 + N, D): the pre-normed embeddings, then each block's
        output."""
        states = [self.pre_layrnorm(self.embeddings(pixel_values))]
        for block in self.blocks:
            states.append(self._run(states[-1], [block]))
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, D), the last block's output (transformers'
        last_hidden_state)."""
        return self._run(self.pre_layrnorm(self.embeddings(pixel_values)), self.blocks)

    def features(self, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """hidden_states(pixel_values)[layer] without the CLS token: (B, N, D). Runs only the
        blocks it needs."""
        check_layer(layer, self.config.num_hidden_layers)
        blocks = self.blocks[:self.config.blocks_run(layer)]
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        return self._run(x, blocks)[:, self.config.prefix_tokens:]


# Config files and presets

# CLIPVisionConfig's defaults, for fields a hub config.json may omit (older saves list only what
# differs).
HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def _fields_of(d: dict) -> dict:
    """A config.json dict (vision-only, or a full CLIP model's with "vision_config") ->
    CLIPConfig's arguments."""
    if d.get("model_type") == "clip":
        d = dict(d.get("vision_config") or {})
        d["model_type"] = "clip_vision_model"
    if d.get("model_type") not in (None, "clip_vision_model"):
        raise LlavaMinError(f"model_type {d['model_type']!r} is not a CLIP config (expected 'clip' or "
                            "'clip_vision_model')")
    names = {f.name for f in dataclasses.fields(CLIPConfig)}
    return HF_DEFAULTS | {k: v for k, v in d.items() if k in names}


def _validate(c: CLIPConfig) -> None:
    def bad(field, why):
        raise LlavaMinError(f"{field} = {getattr(c, field)!r} {why}")

    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                  "image_size", "num_channels"):
        if type(getattr(c, field)) is not int or getattr(c, field) < 1:
            bad(field, "must be a positive integer")
    if c.hidden_size % c.num_attention_heads:
        bad("hidden_size", f"must be divisible by num_attention_heads = {c.num_attention_heads}")
    if c.image_size < c.patch_size:
        bad("image_size", f"must be at least patch_size = {c.patch_size}")
    if c.hidden_act not in ACTIVATIONS:
        bad("hidden_act", f"is not supported; use one of {sorted(ACTIVATIONS)}")


PRESETS: dict[str, CLIPConfig] = {
    # a few-kilobyte tower for tests and CPU demos (layer -2 is the first block's output)
    "tiny-clip": CLIPConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            patch_size=14, image_size=56),
    # openai/clip-vit-large-patch14-336's vision_config, XTuner's and LLaVA-1.5's tower
    "clip-vit-large-patch14-336": CLIPConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16, patch_size=14, image_size=336,
                                             projection_dim=768),
}


def load_config(name_or_path) -> CLIPConfig:
    """A preset name (see PRESETS), a config.json file, or a model folder holding one."""
    return weights.load_config(name_or_path, PRESETS, CLIPConfig.from_dict, "CLIP")


def num_parameters(config: CLIPConfig) -> int:
    """Weights in a checkpoint of this config (every tensor of the state dict), counted on the meta
    device."""
    return weights.numel_on_meta(lambda: CLIP(config), repr(config))

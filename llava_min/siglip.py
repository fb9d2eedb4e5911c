"""SigLIP's vision tower, as LLaVA-OneVision uses it: google/siglip-so400m-patch14-384,
siglip-base-patch16-224.

transformers' `SiglipVisionModel` in plain PyTorch (matched to 1e-4 by tests/test_siglip.py), its
modules named like the keys of a vision-only save. Hidden states are the N patches alone,
row-major: no CLS token, so LLaVA-OneVision feeds every token of hidden state -2 to its projector.
Against CLIP: no pre-LayerNorm, tanh-GELU, a biased patch convolution, and a final LayerNorm on
every token. The encoder layer is CLIP's (`clip.Block`, the same names and math). The
attention-pooling head (`head.*`) serves SigLIP's image-text loss only and is not built here.
References: Zhai et al. 2023; transformers `models/siglip/modeling_siglip.py`.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import LlavaMinError, weights
from .clip import ACTIVATIONS, Block
from .dinov2 import check_layer
from .image import Preprocessing, check_image_size

# Checkpoint key -> module key. The hub ships the whole SigLIP model (vision_model.*, text_model.*,
# logit_scale, logit_bias); transformers 5 saves a SiglipVisionModel without the "vision_model."
# prefix.
KEY_MAP = [(r"^vision_model\.", "")]
# What a full checkpoint holds besides the tower, and the pooling head; `from_pretrained` names
# what it left unread.
IGNORE = [r"^text_model\.", r"^logit_scale$", r"^logit_bias$", r"^(vision_model\.)?head\.", r"position_ids$"]

# SigLIP's processor: mean and std 0.5, the image resized to the square input (bicubic), no crop.
PREPROCESSING = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_ratio=None)


@dataclass
class SigLIPConfig:
    """The fields of a SiglipVisionConfig (config.json, or a full model's "vision_config") that
    shape the tower."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int = 16
    # The position table covers (image_size // patch_size) ** 2 patches
    image_size: int = 224
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    num_channels: int = 3
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
        """Tokens before the patches: none."""
        return 0

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
    def from_dict(cls, d: dict) -> "SigLIPConfig":
        return cls(**_fields_of(dict(d)))

    def to_dict(self) -> dict:
        """The config.json of a vision-only save, which transformers' SiglipVisionModel reads
        (without the head)."""
        return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
                **dataclasses.asdict(self), "vision_use_head": False}


# The network

class Embeddings(nn.Module):
    def __init__(self, config: SigLIPConfig):
        super().__init__()
        D = config.hidden_size
        self.config = config
        self.patch_embedding = nn.Conv2d(config.num_channels, D, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.grid_size ** 2, D)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings (1, N, D) for a height x width image; resized as transformers'
        `interpolate_pos_encoding` does (bicubic to the target grid, no antialiasing) when the grid
        differs."""
        table = self.position_embedding.weight[None]                        # (1, side^2, D)
        side = self.config.grid_size
        rows = height // self.config.patch_size
        cols = width // self.config.patch_size
        if rows == cols == side:
            return table
        grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)         # (1, D, side, side)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)         # (1, N, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _, _, H, W = pixel_values.shape
        check_image_size(H, W, self.config.patch_size)
        conv = self.patch_embedding
        # (B, D, H/p, W/p) -> (B, N, D)
        x = conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.positions(H, W)


class SigLIP(nn.Module):
    """forward -> final-normed tokens (transformers' last_hidden_state); hidden_states -> every
    block's output; features -> LLaVA's input."""

    config_class = SigLIPConfig

    def __init__(self, config: SigLIPConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))})
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms (transformers draws
        lecun-normal ones)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.initializer_range)
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    @staticmethod
    def load_config(name_or_path) -> SigLIPConfig:
        return load_config(name_or_path)

    @staticmethod
    def presets() -> dict[str, SigLIPConfig]:
        return PRESETS

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> "SigLIP":
        """A hub folder (a vision-only save, or the full SigLIP model: its vision tower), in eval
        mode: built on meta, each tensor read once, memory-mapped, to `device` in `dtype`. Says
        what it left unread."""
        config = load_config(Path(path))
        model = weights.build_on_meta(lambda: cls(config))
        unread = weights.load_into(model, path, key_map=KEY_MAP, ignore=IGNORE, dtype=dtype, device=device)
        if unread:
            print(f"{path}: read the SigLIP vision tower; left unread: {weights.summarise_keys(unread)}",
                  file=sys.stderr, flush=True)
        return model.eval()

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
        """A vision-only save (SiglipVisionModel's keys and config.json), cast to `dtype` on the
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
        """num_layers + 1 tensors (B, N, D): the embeddings, then each block's output (none
        normed)."""
        states = [self.embeddings(pixel_values)]
        for block in self.blocks:
            states.append(self._run(states[-1], [block]))
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) after the final LayerNorm (transformers'
        last_hidden_state)."""
        return self.post_layernorm(self._run(self.embeddings(pixel_values), self.blocks))

    def features(self, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """hidden_states(pixel_values)[layer], every token: (B, N, D). Runs only the blocks it
        needs."""
        check_layer(layer, self.config.num_hidden_layers)
        blocks = self.blocks[:self.config.blocks_run(layer)]
        return self._run(self.embeddings(pixel_values), blocks)


# Config files and presets

# SiglipVisionConfig's defaults, for fields a hub config.json may omit.
HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def _fields_of(d: dict) -> dict:
    """A config.json dict (vision-only, or a full SigLIP model's with "vision_config") ->
    SigLIPConfig's arguments."""
    if d.get("model_type") == "siglip":
        d = dict(d.get("vision_config") or {})
        d["model_type"] = "siglip_vision_model"
    if d.get("model_type") not in (None, "siglip_vision_model"):
        raise LlavaMinError(f"model_type {d['model_type']!r} is not a SigLIP config (expected 'siglip' or "
                            "'siglip_vision_model')")
    names = {f.name for f in dataclasses.fields(SigLIPConfig)}
    return HF_DEFAULTS | {k: v for k, v in d.items() if k in names}


def _validate(c: SigLIPConfig) -> None:
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


PRESETS: dict[str, SigLIPConfig] = {
    # a few-kilobyte tower for tests and CPU demos (layer -2 is the first block's output)
    "tiny-siglip": SigLIPConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                patch_size=14, image_size=56),
    # the released vision_config values
    "siglip-so400m-patch14-384": SigLIPConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                              num_attention_heads=16, patch_size=14, image_size=384),
    "siglip-base-patch16-224": SigLIPConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, patch_size=16, image_size=224),
}


def load_config(name_or_path) -> SigLIPConfig:
    """A preset name (see PRESETS), a config.json file, or a model folder holding one."""
    return weights.load_config(name_or_path, PRESETS, SigLIPConfig.from_dict, "SigLIP")


def num_parameters(config: SigLIPConfig) -> int:
    """Weights in a checkpoint of this config (every tensor of the state dict), counted on the meta
    device."""
    return weights.numel_on_meta(lambda: SigLIP(config), repr(config))

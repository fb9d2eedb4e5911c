"""DINOv2, the vision tower: facebook/dinov2-{small,base,large,giant} and the -reg variants. Start
at `DINOv2`.

transformers' `Dinov2Model` / `Dinov2WithRegistersModel` in plain PyTorch (matched to 1e-4 by
tests/test_dinov2.py), its modules named like the hub keys. Hidden states are [CLS, R registers, N
patches], patches row-major. References: facebookresearch/dinov2; Oquab et al. 2023; Darcet et al.
2023 (registers).
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
from .image import IMAGENET, Preprocessing, check_image_size

# Checkpoint key -> module key. The image-classification checkpoints (Dinov2ForImageClassification)
# nest the backbone under "dinov2." beside a classifier head that nobody here reads.
KEY_MAP = [(r"^dinov2\.", "")]
IGNORE = [r"^classifier\."]


@dataclass
class DINOv2Config:
    """The fields of the hub config.json that shape the model; others are ignored (dropout: 0 in
    every release)."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    mlp_ratio: float = 4
    patch_size: int = 14
    # The position table covers (image_size // patch_size) ** 2 patches
    image_size: int = 518
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    # dinov2-giant: SwiGLU FFN (weights_in / weights_out) instead of fc1 / fc2
    use_swiglu_ffn: bool = False
    num_register_tokens: int = 0      # > 0: the with-registers variant
    qkv_bias: bool = True
    hidden_act: str = "gelu"          # of the fc1/fc2 MLP; the SwiGLU FFN always uses SiLU
    num_channels: int = 3
    # The checkpoints carry embeddings.mask_token (used in DINOv2 pretraining only)
    use_mask_token: bool = True
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
    def prefix_tokens(self) -> int:
        """Tokens before the patches: CLS and the registers."""
        return 1 + self.num_register_tokens

    @property
    def preprocessing(self) -> Preprocessing:
        """ImageNet statistics; the processor's "crop": shortest edge to 256 / 224 of the size,
        centre crop."""
        return IMAGENET

    def image_tokens(self, image_size: int) -> int:
        """Patch tokens (= LLM positions) of one square image_size x image_size input."""
        return (image_size // self.patch_size) ** 2

    def blocks_run(self, layer: int) -> int:
        """Blocks `features(layer=...)` runs: hidden state `layer` (-2: the penultimate block's
        output)."""
        return layer % (self.num_hidden_layers + 1)

    @property
    def ffn_hidden_size(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        # SwiGLU keeps 2/3 of the width, rounded up to a multiple of 8 (giant: 4096)
        if self.use_swiglu_ffn:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @classmethod
    def from_dict(cls, d: dict) -> "DINOv2Config":
        return cls(**_fields_of(dict(d)))

    def to_dict(self) -> dict:
        """The hub config.json form that transformers reads (Dinov2Model or
        Dinov2WithRegistersModel)."""
        registers = self.num_register_tokens > 0
        d = {"architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
             "model_type": "dinov2_with_registers" if registers else "dinov2", **dataclasses.asdict(self)}
        del d["use_mask_token" if registers else "num_register_tokens"]   # not a field there
        return d


# The network

class Embeddings(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        D = config.hidden_size
        self.config = config
        self.cls_token = nn.Parameter(torch.empty(1, 1, D))
        if config.use_mask_token:
            # A buffer: it round-trips through checkpoints but is never trained (a gradient-less
            # parameter upsets DDP).
            self.register_buffer("mask_token", torch.zeros(1, D))
        self.position_embeddings = nn.Parameter(torch.empty(1, config.grid_size ** 2 + 1, D))
        self.patch_embeddings = nn.ModuleDict({"projection": nn.Conv2d(
            config.num_channels, D, kernel_size=config.patch_size, stride=config.patch_size)})
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.empty(1, config.num_register_tokens, D))

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings (1, 1 + N, D) for a height x width image, as transformers 5.x
        computes them."""
        pos = self.position_embeddings
        side = self.config.grid_size
        rows = height // self.config.patch_size
        cols = width // self.config.patch_size
        if rows * cols == side ** 2 and height == width:
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        # Bicubic in fp32 to a target size (a scale factor would move the sample points); only
        # transformers' registers class antialiases.
        grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False,
                             antialias=self.config.num_register_tokens > 0).to(pos.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)      # (1, N, D)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        check_image_size(H, W, self.config.patch_size)
        conv = self.patch_embeddings.projection
        # (B, D, H/p, W/p) -> (B, N, D)
        x = conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)           # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(H, W)
        if self.config.num_register_tokens:   # after the CLS token, without a position embedding
            # (B, 1 + R + N, D)
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x


class Attention(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        # The hub nests the projections one level deeper (attention.attention.query,
        # attention.output.dense).
        self.attention = nn.ModuleDict({name: nn.Linear(D, D, bias=config.qkv_bias)
                                        for name in ("query", "key", "value")})
        self.output = nn.ModuleDict({"dense": nn.Linear(D, D)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (self.attention[name](x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for name in ("query", "key", "value"))                  # each (B, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v)                        # bidirectional: no mask
        # (B, T, heads * head_dim)
        return self.output["dense"](y.transpose(1, 2).reshape(B, T, D))


class LayerScale(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.empty(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class MLP(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_hidden_size)
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.weights_in = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size)
        self.weights_out = nn.Linear(config.ffn_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dinov2-giant: gate and up stacked, each (B, T, ffn_hidden)
        gate, up = self.weights_in(x).chunk(2, dim=-1)
        return self.weights_out(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        D = config.hidden_size
        eps = config.layer_norm_eps
        self.norm1 = nn.LayerNorm(D, eps=eps)
        self.attention = Attention(config)
        self.layer_scale1 = LayerScale(config)
        self.norm2 = nn.LayerNorm(D, eps=eps)
        self.mlp = SwiGLUFFN(config) if config.use_swiglu_ffn else MLP(config)
        self.layer_scale2 = LayerScale(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """forward -> final-normed tokens; hidden_states -> every block's output; features -> LLaVA's
    input."""

    config_class = DINOv2Config

    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))})
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' init: truncated-normal weights, zero biases, LayerScale at
        layerscale_value."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()            # ones and zeros
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.lambda1, self.config.layerscale_value)
        nn.init.trunc_normal_(self.embeddings.position_embeddings, std=std)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=std)
        if self.config.num_register_tokens:
            nn.init.zeros_(self.embeddings.register_tokens)

    @staticmethod
    def load_config(name_or_path) -> DINOv2Config:
        return load_config(name_or_path)

    @staticmethod
    def presets() -> dict[str, DINOv2Config]:
        return PRESETS

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> "DINOv2":
        """A hub folder, in eval mode: built on meta, each tensor read once, memory-mapped, to
        `device` in `dtype`. Says what an image-classification checkpoint left unread (its
        classifier)."""
        config = load_config(Path(path))
        model = weights.build_on_meta(lambda: cls(config))
        unread = weights.load_into(model, path, key_map=KEY_MAP, ignore=IGNORE, dtype=dtype, device=device)
        if unread:
            print(f"{path}: read the DINOv2 backbone; left unread: {weights.summarise_keys(unread)}",
                  file=sys.stderr, flush=True)
        return model.eval()

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
        """The hub format, cast to `dtype` on the way (None: as the parameters)."""
        weights.save_state(self.state_dict(), path, dtype=dtype, max_shard_bytes=max_shard_bytes)
        dtype = str(dtype or self.layernorm.weight.dtype).removeprefix("torch.")
        weights.write_json(self.config.to_dict() | {"torch_dtype": dtype}, Path(path) / weights.CONFIG_FILE)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS and the registers."""
        return self.config.prefix_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks in order: the units of checkpointing, FSDP, FLOP and memory
        counts."""
        return self.encoder.layer

    def freeze_unused(self, layer: int) -> None:
        """Freeze what `features(layer=...)` never runs (later blocks, the final norm): no gradient
        reaches it."""
        for block in self.blocks[self.config.blocks_run(layer):]:
            block.requires_grad_(False)
        self.layernorm.requires_grad_(False)

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
        """num_layers + 1 tensors (B, 1 + R + N, D): the embeddings, then each block's output (none
        normed)."""
        states = [self.embeddings(pixel_values)]
        for block in self.blocks:
            states.append(self._run(states[-1], [block]))
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + R + N, D) after the final LayerNorm (transformers'
        last_hidden_state)."""
        return self.layernorm(self._run(self.embeddings(pixel_values), self.blocks))

    def features(self, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """hidden_states(pixel_values)[layer] without the CLS and register tokens: (B, N, D). Runs
        only the blocks that layer needs (-2 skips the last block and the final LayerNorm)."""
        check_layer(layer, self.config.num_hidden_layers)
        blocks = self.blocks[:self.config.blocks_run(layer)]
        return self._run(self.embeddings(pixel_values), blocks)[:, self.config.prefix_tokens:]


def check_layer(layer: int, n: int) -> None:
    """A hidden-state index of a tower with n blocks, as Python indexes a list of n + 1 (every
    tower's `features` checks its layer here)."""
    if not -(n + 1) <= layer <= n:
        raise LlavaMinError(f"layer {layer} is out of range for a ViT with {n} blocks (hidden states are "
                            f"indexed {-(n + 1)}..{n})")


# Config files and presets

# transformers' ACT2FN entries that the fc1/fc2 MLP may name ("gelu" is the exact erf form).
ACTIVATIONS = {"gelu": F.gelu, "gelu_new": partial(F.gelu, approximate="tanh"),
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu, "silu": F.silu}

# transformers' class defaults where they differ from this dataclass's, for fields a hub
# config.json may omit.
HF_DEFAULTS = {"dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224),
               "dinov2_with_registers": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                             image_size=224, patch_size=16, num_register_tokens=4)}


def _fields_of(d: dict) -> dict:
    """A hub config.json dict -> DINOv2Config's arguments; omitted fields take transformers'
    defaults."""
    model_type = d.get("model_type")
    if model_type not in (None, *HF_DEFAULTS):
        raise LlavaMinError(f"model_type {model_type!r} is not a DINOv2 config (expected one of {sorted(HF_DEFAULTS)})")
    fields = dataclasses.fields(DINOv2Config)
    values = HF_DEFAULTS.get(model_type, {}) | {k: v for k, v in d.items() if k in {f.name for f in fields}}
    if model_type == "dinov2":
        # not a field of Dinov2Config: transformers ignores it
        values["num_register_tokens"] = 0
    if model_type == "dinov2_with_registers":
        values["use_mask_token"] = True        # not a field of the registers config: always there
        if values["num_register_tokens"] == 0:
            raise LlavaMinError("model_type dinov2_with_registers needs num_register_tokens > 0; use model_type dinov2")
    # transformers accepts [h, w]; the stored grid is square
    for field in ("image_size", "patch_size"):
        if isinstance(values.get(field), (list, tuple)):
            if len(values[field]) != 2 or values[field][0] != values[field][1]:
                raise LlavaMinError(f"{field} = {values[field]!r}: only square sizes are supported")
            values[field] = values[field][0]
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise LlavaMinError(f"missing field {missing[0]!r} (all missing: {missing})")
    return values


def _validate(c: DINOv2Config) -> None:
    def bad(field, why):
        raise LlavaMinError(f"{field} = {getattr(c, field)!r} {why}")

    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size",
                  "num_channels"):
        if type(getattr(c, field)) is not int or getattr(c, field) < 1:
            bad(field, "must be a positive integer")
    if c.hidden_size % c.num_attention_heads:
        bad("hidden_size", f"must be divisible by num_attention_heads = {c.num_attention_heads}")
    if c.image_size < c.patch_size:
        bad("image_size", f"must be at least patch_size = {c.patch_size}")
    if c.hidden_act not in ACTIVATIONS:
        bad("hidden_act", f"is not supported; use one of {sorted(ACTIVATIONS)}")


PRESETS: dict[str, DINOv2Config] = {
    # a few-kilobyte ViT for tests and CPU demos (layer -2 is the first block's output)
    "tiny": DINOv2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56),
}
for _name, (_hidden, _layers, _heads) in {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
                                          "giant": (1536, 40, 24)}.items():
    for _suffix, _registers in (("", 0), ("-reg", 4)):
        PRESETS[f"dinov2-{_name}{_suffix}"] = DINOv2Config(
            hidden_size=_hidden, num_hidden_layers=_layers, num_attention_heads=_heads,
            use_swiglu_ffn=_name == "giant", num_register_tokens=_registers)


def load_config(name_or_path) -> DINOv2Config:
    """A preset name (see PRESETS), a config.json file, or a model folder holding one."""
    return weights.load_config(name_or_path, PRESETS, DINOv2Config.from_dict, "DINOv2")


def num_parameters(config: DINOv2Config) -> int:
    """Weights in a checkpoint of this config (every tensor of the state dict), counted on the meta
    device."""
    return weights.numel_on_meta(lambda: DINOv2(config), repr(config))

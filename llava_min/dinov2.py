"""DINOv2 vision transformer: facebook/dinov2-{small,base,large,giant} and the with-registers variants.

A plain PyTorch copy of transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (5.x), reading and writing
the hub checkpoints unchanged: every module is named exactly as its hub key, so the state dict *is* the hub
layout and no renaming happens on load or save.

References:
  * transformers `models/dinov2/modeling_dinov2.py` and `models/dinov2_with_registers/modeling_dinov2_with_registers.py`
    (the numerics this file must match, position-embedding interpolation included);
  * facebookresearch/dinov2 `dinov2/models/vision_transformer.py` (the original);
  * Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision";
    Darcet et al. 2023, "Vision Transformers Need Registers".

Token layout of every hidden state: [CLS, R register tokens, N patch tokens] with N = (H/p) * (W/p), patches in
row-major order over the grid. LLaVA takes `features(pixel_values, layer=-2)`: the second-to-last block's output
without the 1 + R prefix tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .weights import CheckpointError, build_on_meta, load_into, read_config, save_state, write_json

# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class DINOv2Config:
    """The fields of the hub `config.json` that shape the model (HF names). HF-only fields are ignored:
    dropout and drop-path rates (0 in every released checkpoint; this implementation has no dropout),
    backbone options (out_features, apply_layernorm, ...), dtype."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    mlp_ratio: float = 4
    patch_size: int = 14
    image_size: int = 518             # the position-embedding table covers (image_size // patch_size)**2 patches
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False      # dinov2-giant: SwiGLU FFN (weights_in / weights_out) instead of fc1 / fc2
    num_register_tokens: int = 0      # > 0: the with-registers variant (model_type dinov2_with_registers)
    qkv_bias: bool = True
    hidden_act: str = "gelu"          # activation of the fc1/fc2 MLP; the SwiGLU FFN always uses SiLU
    num_channels: int = 3
    use_mask_token: bool = True       # the checkpoints carry embeddings.mask_token (unused outside DINOv2 pretraining)
    initializer_range: float = 0.02

    def __post_init__(self):
        self.validate()

    # Derived sizes ------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Side of the square patch grid that the stored position embeddings cover (37 for 518 / 14)."""
        return self.image_size // self.patch_size

    def image_tokens(self, image_size: int) -> int:
        """Patch tokens (= LLM positions) of one square image_size x image_size input."""
        return (image_size // self.patch_size) ** 2

    def blocks_run(self, layer: int) -> int:
        """Blocks that `features(layer=...)` runs: hidden state `layer` (-2 = the penultimate block's output)
        needs the blocks before it only."""
        return layer % (self.num_hidden_layers + 1)

    @property
    def ffn_hidden_size(self) -> int:
        """Width of the MLP's hidden layer (fc1 output, or one half of the SwiGLU weights_in output)."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            # SwiGLU keeps two thirds of the width, rounded up to a multiple of 8 (1536 * 4 -> 4096 for giant)
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def model_type(self) -> str:
        return "dinov2_with_registers" if self.num_register_tokens > 0 else "dinov2"

    # Validation / conversion --------------------------------------------------------------------
    def validate(self, source: str = "DINOv2Config") -> None:
        def bad(field, why):
            raise CheckpointError(f"{source}: {field} = {getattr(self, field)!r} {why}")

        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size",
                      "num_channels"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(field, "must be a positive integer")
        if isinstance(self.num_register_tokens, bool) or not isinstance(self.num_register_tokens, int) \
                or self.num_register_tokens < 0:
            bad("num_register_tokens", "must be an integer >= 0")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"must be divisible by num_attention_heads = {self.num_attention_heads}")
        if self.image_size < self.patch_size:
            bad("image_size", f"must be at least patch_size = {self.patch_size}")
        if not isinstance(self.mlp_ratio, (int, float)) or self.ffn_hidden_size < 1:
            bad("mlp_ratio", "must be a positive number")
        if not self.layer_norm_eps > 0:
            bad("layer_norm_eps", "must be > 0")
        if self.hidden_act not in ACTIVATIONS:
            bad("hidden_act", f"is not supported; use one of {sorted(ACTIVATIONS)}")
        if self.num_register_tokens and not self.use_mask_token:
            bad("use_mask_token", "cannot be false for the with-registers variant (its checkpoints always "
                                  "carry embeddings.mask_token)")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "DINOv2Config":
        """Build from a hub config.json dict. Fields it lacks take transformers' class defaults for its
        model_type (as transformers would), or this dataclass's defaults when it has no model_type."""
        model_type = d.get("model_type")
        if model_type not in (None, *HF_DEFAULTS):
            raise CheckpointError(f"{source}: model_type {model_type!r} is not a DINOv2 config "
                                  f"(expected one of {sorted(HF_DEFAULTS)})")
        values = dict(HF_DEFAULTS.get(model_type, {}))
        names = {f.name for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in d.items() if k in names})
        if model_type == "dinov2":
            values["num_register_tokens"] = 0      # not a field of Dinov2Config; transformers ignores it
        if model_type == "dinov2_with_registers":
            values["use_mask_token"] = True        # not a field of the registers config: always present
            if values.get("num_register_tokens") == 0:
                raise CheckpointError(f"{source}: model_type dinov2_with_registers with num_register_tokens = 0 "
                                      "is not supported; use model_type dinov2")
        for field in ("image_size", "patch_size"):
            # transformers accepts [h, w]; the stored position grid is square, so only equal sides make sense
            value = values.get(field)
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or value[0] != value[1]:
                    raise CheckpointError(f"{source}: {field} = {value!r}: only square sizes are supported")
                values[field] = value[0]
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise CheckpointError(f"{source}: missing field {missing[0]!r} (all missing: {missing})")
        config = cls.__new__(cls)  # bypass __init__ so that a validation error names the file
        for k, v in values.items():
            setattr(config, k, v)
        config.validate(source)
        return config

    def to_dict(self) -> dict:
        """The hub config.json form that transformers reads (Dinov2Model or Dinov2WithRegistersModel)."""
        registers = self.num_register_tokens > 0
        d = {"architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
             "model_type": self.model_type}
        d.update(dataclasses.asdict(self))
        if registers:
            del d["use_mask_token"]
        else:
            del d["num_register_tokens"]
        return d


# transformers' class defaults for fields a hub config.json may omit (they differ from this dataclass's
# defaults: the HF classes default to image_size 224, and the registers class to patch_size 16).
HF_DEFAULTS = {
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14,
                   image_size=224, layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False,
                   qkv_bias=True, hidden_act="gelu", num_channels=3, use_mask_token=True, initializer_range=0.02),
    "dinov2_with_registers": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                  patch_size=16, image_size=224, layer_norm_eps=1e-6, layerscale_value=1.0,
                                  use_swiglu_ffn=False, num_register_tokens=4, qkv_bias=True, hidden_act="gelu",
                                  num_channels=3, initializer_range=0.02),
}

# transformers' ACT2FN entries that the fc1/fc2 MLP may name ("gelu" is the exact erf form).
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}

_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "giant": (1536, 40, 24)}
PRESETS: dict[str, DINOv2Config] = {
    # a few-kilobyte ViT for tests and CPU demos (2 blocks, so layer -2 is the first block's output)
    "tiny": DINOv2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56),
}
for _name, (_hidden, _layers, _heads) in _SIZES.items():
    for _suffix, _registers in (("", 0), ("-reg", 4)):
        PRESETS[f"dinov2-{_name}{_suffix}"] = DINOv2Config(
            hidden_size=_hidden, num_hidden_layers=_layers, num_attention_heads=_heads,
            use_swiglu_ffn=_name == "giant", num_register_tokens=_registers)


def load_config(name_or_path) -> DINOv2Config:
    """A preset name (see PRESETS), a config.json file, or a model folder holding one."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return dataclasses.replace(PRESETS[name_or_path])
    path = Path(name_or_path)
    if not path.exists():
        raise CheckpointError(f"{name_or_path}: neither a DINOv2 preset ({', '.join(PRESETS)}) "
                              "nor a config.json file or model folder")
    file = path / "config.json" if path.is_dir() else path
    return DINOv2Config.from_dict(read_config(path), source=str(file))


def num_parameters(config: DINOv2Config) -> int:
    """Number of weights in a checkpoint of this config (every tensor of the state dict), from the config alone."""
    D, F_ = config.hidden_size, config.ffn_hidden_size
    p, C = config.patch_size, config.num_channels
    embeddings = (D                                            # cls_token
                  + D * config.use_mask_token                  # mask_token
                  + (config.grid_size ** 2 + 1) * D            # position_embeddings
                  + D * C * p * p + D                          # patch projection
                  + config.num_register_tokens * D)
    attention = 3 * D * D + 3 * D * config.qkv_bias + D * D + D
    if config.use_swiglu_ffn:
        mlp = D * 2 * F_ + 2 * F_ + F_ * D + D                 # weights_in, weights_out
    else:
        mlp = D * F_ + F_ + F_ * D + D                         # fc1, fc2
    block = 4 * D + attention + mlp + 2 * D                    # norm1, norm2, ..., layer_scale1/2
    return embeddings + config.num_hidden_layers * block + 2 * D


# --------------------------------------------------------------------------------------------------
# Model. Attribute names reproduce the hub keys (see module docstring).


class PatchEmbeddings(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size,
                                    kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.projection(pixel_values.to(self.projection.weight.dtype))  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)                                # (B, N, D), row-major over the grid


class Embeddings(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        D = config.hidden_size
        self.config = config
        self.cls_token = nn.Parameter(torch.empty(1, 1, D))
        if config.use_mask_token:
            # Only DINOv2's masked-image pretraining uses it. Kept as a buffer so that it round-trips through
            # checkpoints but is never trained (a parameter without gradient would upset DDP).
            self.register_buffer("mask_token", torch.zeros(1, D))
        self.position_embeddings = nn.Parameter(torch.empty(1, config.grid_size ** 2 + 1, D))
        self.patch_embeddings = PatchEmbeddings(config)
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.empty(1, config.num_register_tokens, D))

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an image of height x width pixels: (1, 1 + N, D).

        Exactly transformers 5.x `interpolate_pos_encoding`: the stored table is used as is when the image is
        square with the stored number of patches; otherwise the patch part is resized bicubically in float32
        to (H/p, W/p) by target size (not scale factor, which would move the sample points), with antialiasing
        for the with-registers variant only (its transformers class does so).
        """
        pos = self.position_embeddings
        stored = pos.shape[1] - 1
        rows, cols = height // self.config.patch_size, width // self.config.patch_size
        if rows * cols == stored and height == width:
            return pos
        D, side = pos.shape[-1], int(stored ** 0.5)
        grid = pos[:, 1:].reshape(1, side, side, D).permute(0, 3, 1, 2)  # (1, D, side, side)
        grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False,
                             antialias=self.config.num_register_tokens > 0).to(pos.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, D)       # (1, N, D)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, C, H, W = pixel_values.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"image height {H} and width {W} must both be multiples of the patch size {p}; "
                             f"resize or crop the image (e.g. to {H // p * p or p} x {W // p * p or p})")
        if C != self.config.num_channels:
            raise ValueError(f"pixel_values has {C} channels but the model expects {self.config.num_channels}")
        x = self.patch_embeddings(pixel_values)                               # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)           # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(H, W)
        if self.config.num_register_tokens:
            # registers go after the CLS token and get no position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)  # (B, 1 + R + N, D)
        return x


class Attention(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        D = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        # The hub nests the projections one level deeper (attention.attention.query, attention.output.dense);
        # these containers reproduce the names so checkpoints load without renaming.
        self.attention = nn.ModuleDict({name: nn.Linear(D, D, bias=config.qkv_bias)
                                        for name in ("query", "key", "value")})
        self.output = nn.ModuleDict({"dense": nn.Linear(D, D)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (self.attention[name](x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for name in ("query", "key", "value"))                  # each (B, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)  # bidirectional: no mask
        y = y.transpose(1, 2).reshape(B, T, D)                                # (B, T, heads * head_dim)
        return self.output["dense"](y)


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
    """dinov2-giant's FFN: weights_in holds the gate and the up projection stacked (gate first)."""

    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.weights_in = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size)
        self.weights_out = nn.Linear(config.ffn_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.weights_in(x).chunk(2, dim=-1)                        # each (B, T, ffn_hidden)
        return self.weights_out(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + ls1 * attn(norm1(x)), then + ls2 * mlp(norm2(x))."""

    def __init__(self, config: DINOv2Config):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(D, eps=eps)
        self.attention = Attention(config)
        self.layer_scale1 = LayerScale(config)
        self.norm2 = nn.LayerNorm(D, eps=eps)
        self.mlp = SwiGLUFFN(config) if config.use_swiglu_ffn else MLP(config)
        self.layer_scale2 = LayerScale(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.layer = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))


# Checkpoint key -> module key. Hub keys already are module keys; the image-classification checkpoints
# (Dinov2ForImageClassification and its registers twin) nest them under "dinov2." beside a classifier head.
KEY_MAP = [(r"^dinov2\.", "")]
IGNORE = [r"^classifier\."]


class DINOv2(nn.Module):
    """DINOv2 ViT. forward -> final-normed tokens; hidden_states -> every block's output; features -> LLaVA's input.

    Parity with transformers' Dinov2Model / Dinov2WithRegistersModel is tested in tests/test_dinov2.py.
    """

    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation as transformers does it (truncated normal weights, zero biases, LayerScale at
        layerscale_value). A no-op on the meta device, where from_pretrained builds the model."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.lambda1, self.config.layerscale_value)
        nn.init.trunc_normal_(self.embeddings.position_embeddings, std=std)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=std)
        if self.config.num_register_tokens:
            nn.init.zeros_(self.embeddings.register_tokens)

    # Sizes --------------------------------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS and the registers."""
        return 1 + self.config.num_register_tokens

    def num_patches(self, height: int, width: int) -> int:
        """Patch tokens for a height x width image (what features() returns per image)."""
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"image height {height} and width {width} must both be multiples of the patch "
                             f"size {p}")
        return (height // p) * (width // p)

    # Forward ------------------------------------------------------------------------------------
    def set_gradient_checkpointing(self, flag: bool) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.gradient_checkpointing = bool(flag)

    def _block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """num_layers + 1 tensors (B, 1 + R + N, D): the embeddings, then each block's output; none normed
        (transformers' `output_hidden_states` order)."""
        x = self.embeddings(pixel_values)
        states = [x]
        for block in self.encoder.layer:
            x = self._block(block, x)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + R + N, D) after the final LayerNorm (transformers' last_hidden_state)."""
        x = self.embeddings(pixel_values)
        for block in self.encoder.layer:
            x = self._block(block, x)
        return self.layernorm(x)

    def features(self, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """hidden_states(pixel_values)[layer] without the CLS and register tokens: (B, N, D).

        Runs only the blocks that layer needs (layer -2 skips the last block and the final LayerNorm).
        """
        n = self.config.num_hidden_layers
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"layer {layer} is out of range for a ViT with {n} blocks "
                             f"(hidden states are indexed {-(n + 1)}..{n})")
        stop = layer % (n + 1)                     # index into hidden_states = number of blocks to run
        x = self.embeddings(pixel_values)
        for block in self.encoder.layer[:stop]:
            x = self._block(block, x)
        return x[:, self.num_prefix_tokens:]

    # Checkpoints --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype | None = None, device="cpu") -> "DINOv2":
        """Load a hub folder (config.json + model.safetensors or shards), e.g. facebook/dinov2-large."""
        config = load_config(Path(folder))
        model = build_on_meta(lambda: cls(config))
        load_into(model, folder, key_map=KEY_MAP, ignore=IGNORE, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, folder) -> None:
        """Write the hub format (config.json + model.safetensors) that transformers and from_pretrained read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_state(self.state_dict(), folder)
        write_json(self.config.to_dict(), folder / "config.json")

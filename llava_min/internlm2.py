"""InternLM2, the language model of LLaVA-InternLM2, in one file.

Reads and writes the released Hugging Face checkpoints (`internlm/internlm2-chat-1_8b`, `-7b`: config.json
plus sharded model.safetensors) with the module tree named exactly like the checkpoint keys, so loading
needs no renames:

    model.tok_embeddings                     Embedding(vocab, hidden)
    model.layers.N.attention_norm            RMSNorm
    model.layers.N.attention.wqkv            Linear(hidden, (heads + 2 * kv_heads) * head_dim), grouped layout
    model.layers.N.attention.wo              Linear(hidden, hidden)
    model.layers.N.ffn_norm                  RMSNorm
    model.layers.N.feed_forward.w1/w3/w2     SwiGLU: w2(silu(w1 x) * w3 x)
    model.norm                               RMSNorm
    output                                   Linear(hidden, vocab), not tied to the embedding

The architecture is Llama's: pre-norm blocks, rotary position embeddings (half-split `rotate_half`
convention), grouped-query attention. What is InternLM2's own is the fused `wqkv` projection, laid out
per KV group (see `Attention.forward`; the same split as InternLM's tools/convert2llama.py).

References: the released remote code `modeling_internlm2.py` (InternLM/InternEvo
transformers/internlm2_model/) and transformers' `models/llama/modeling_llama.py` + `modeling_rope_utils.py`
for the rotary scaling, which tests/test_internlm2.py matches to 1e-4.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import weights

# Checkpoint key -> module key. Empty: the module tree mirrors the checkpoint names one to one.
KEY_MAP: list[tuple[str, str]] = []
# Keys some exporters write that nobody reads: rotary tables are recomputed from the config.
IGNORE_KEYS = [r"rotary_emb\.inv_freq$"]

# config.json fields that describe the Hugging Face wrapper, not the network.
HF_ONLY_FIELDS = {"architectures", "auto_map", "torch_dtype", "dtype", "attn_implementation", "use_cache",
                  "transformers_version", "model_type", "_name_or_path", "pretraining_tp"}


class ConfigError(ValueError):
    """A config.json (or a config dict) that does not describe a valid InternLM2."""


# --------------------------------------------------------------------------------------------------
# Config

@dataclass
class InternLM2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rope_scaling: dict | None = None   # {"type": "linear" | "dynamic", "factor": float >= 1} or None
    rms_norm_eps: float = 1e-5
    bias: bool = False                  # biases on wqkv and wo (False in every released checkpoint)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 2
    initializer_range: float = 0.02

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        """G: query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                              f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = hidden_size / num_attention_heads = {self.head_dim} must be even "
                              "(rotary embeddings rotate pairs of dimensions)")
        if self.rope_scaling is not None:
            s = self.rope_scaling
            if not isinstance(s, dict) or s.get("type") not in ("linear", "dynamic"):
                raise ConfigError(f"rope_scaling must be null or {{'type': 'linear' | 'dynamic', 'factor': f}}, "
                                  f"got {s!r}")
            factor = s.get("factor")
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor >= 1:
                raise ConfigError(f"rope_scaling.factor must be a number >= 1, got {factor!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be true or false, got {self.bias!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is None and name == "pad_token_id":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}")

    @classmethod
    def from_dict(cls, d: dict, source: str | os.PathLike = "config") -> "InternLM2Config":
        """Build from a released config.json dict; errors name `source` and the field."""
        d = dict(d)
        try:
            model_type = d.get("model_type", "internlm2")
            if model_type not in ("internlm2", "internlm"):  # very early revisions say "internlm"
                raise ConfigError(f"model_type is {model_type!r}, not an InternLM2 config ('internlm2')")
            if d.pop("hidden_act", "silu") != "silu":
                raise ConfigError("hidden_act must be 'silu' (InternLM2's SwiGLU)")
            if d.pop("tie_word_embeddings", False):
                raise ConfigError("tie_word_embeddings must be false (InternLM2's `output` is its own weight)")
            if d.get("num_key_value_heads") is None and "num_attention_heads" in d:
                d["num_key_value_heads"] = d["num_attention_heads"]  # the released class's default: no GQA
            if d.get("rope_scaling") is not None:
                d["rope_scaling"] = _normalise_rope_scaling(d["rope_scaling"])
            for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
                if isinstance(d.get(name), int) and not isinstance(d[name], bool):
                    d[name] = float(d[name])
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(k for k in d if k not in known and k not in HF_ONLY_FIELDS)
            if unknown:
                raise ConfigError(f"unknown field {unknown[0]!r} (all unknown: {unknown}); remove it, or check the "
                                  "spelling against the released internlm2 config.json")
            missing = [f.name for f in dataclasses.fields(cls)
                       if f.default is dataclasses.MISSING and f.name not in d]
            if missing:
                raise ConfigError(f"missing field {missing[0]!r} (all missing: {missing})")
            return cls(**{k: v for k, v in d.items() if k in known})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """The Hugging Face config.json form (field names and values of the released files)."""
        d = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2"}
        d.update(dataclasses.asdict(self))
        d.update(hidden_act="silu", tie_word_embeddings=False)
        return d


def _normalise_rope_scaling(s) -> dict:
    """Accept the released {"type", "factor"} and newer transformers' {"rope_type", "factor"} spellings."""
    if not isinstance(s, dict):
        raise ConfigError(f"rope_scaling must be null or a dict, got {s!r}")
    s = dict(s)
    if "rope_type" in s and "type" not in s:
        s["type"] = s.pop("rope_type")
    extra = sorted(set(s) - {"type", "factor"})
    if extra:
        raise ConfigError(f"rope_scaling has unsupported field(s) {extra}; only 'type' and 'factor' are read")
    return s


PRESETS: dict[str, InternLM2Config] = {
    # Small enough to train from scratch on a CPU in minutes; same structure as the released models
    # (GQA with 2 query heads per KV head, dynamic NTK rope).
    "tiny": InternLM2Config(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                            rope_scaling={"type": "dynamic", "factor": 2.0}),
    # Released values (internlm/internlm2-chat-1_8b and -7b config.json).
    "internlm2-1_8b": InternLM2Config(vocab_size=92544, hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                                      rope_scaling={"type": "dynamic", "factor": 2.0}),
    "internlm2-7b": InternLM2Config(vocab_size=92544, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    rope_scaling={"type": "dynamic", "factor": 2.0}),
}


def load_config(name_or_path: str | os.PathLike) -> InternLM2Config:
    """A preset name, a config.json file, or a model folder holding config.json."""
    if str(name_or_path) in PRESETS:
        return copy.deepcopy(PRESETS[str(name_or_path)])
    path = Path(name_or_path)
    if not path.exists():
        raise ConfigError(f"{path}: neither a preset ({', '.join(PRESETS)}) nor an existing config.json or model "
                          "folder")
    file = path / weights.CONFIG_FILE if path.is_dir() else path
    return InternLM2Config.from_dict(weights.read_config(file), source=file)


def num_parameters(config: InternLM2Config) -> int:
    """Parameter count from the config alone (7,737,708,544 for internlm2-7b)."""
    c = config
    qkv_rows = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    attention = qkv_rows * c.hidden_size + c.hidden_size * c.hidden_size
    if c.bias:
        attention += qkv_rows + c.hidden_size
    mlp = 3 * c.intermediate_size * c.hidden_size
    norms = 2 * c.hidden_size
    return 2 * c.vocab_size * c.hidden_size + c.num_hidden_layers * (attention + mlp + norms) + c.hidden_size


# --------------------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32, cast back to the input dtype, THEN scale: the released code multiplies the
        # weight with the input-dtype value (InternLM2RMSNorm / LlamaRMSNorm), which matters in bf16.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rotary_tables(config: InternLM2Config, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of position * inv_freq, each (B or 1, T, head_dim / 2), computed in fp32 and cast to dtype.

    Only half the head_dim is returned: the released tables are cat(freqs, freqs), two equal halves, and
    `apply_rotary` uses each half once. Scaling follows transformers' Llama (modeling_rope_utils.py):
      linear:  inv_freq / factor.
      dynamic: NTK-aware base, only when the sequence (max(position_ids) + 1) is longer than
               max_position_embeddings L: base' = theta * (factor * seq / L - (factor - 1)) ** (d / (d - 2)).
    transformers keeps the enlarged frequencies for later, shorter calls until a call is shorter than L;
    here each call depends on its own positions only (identical for one forward or a growing decode).
    """
    d = config.head_dim
    device = position_ids.device
    exponent = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d   # (d/2,)
    inv_freq = 1.0 / (config.rope_theta ** exponent)
    scaling = config.rope_scaling
    if scaling is not None and scaling["type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling is not None and scaling["type"] == "dynamic":
        factor, L = scaling["factor"], config.max_position_embeddings
        seq_len = position_ids.max() + 1     # a device tensor: no host sync in the decode loop
        base = config.rope_theta * ((factor * seq_len / L) - (factor - 1)) ** (d / (d - 2))
        inv_freq = torch.where(seq_len > L, 1.0 / (base ** exponent), inv_freq)
    with torch.autocast(device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq            # (B or 1, T, d/2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., head_dim) by the tables (broadcastable to (..., head_dim / 2)).

    Same numbers as the released `x * cos + rotate_half(x) * sin` with cat(freqs, freqs) tables:
    rotate_half(x) = cat(-x2, x1), so the halves are x1 * c - x2 * s and x2 * c + x1 * s.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Linear(nn.Linear):
    """nn.Linear, with a faster product for the few rows of a decoding step on CPU.

    Decoding multiplies one row per sequence by every weight, so its time is the time to read the weights.
    Written as x @ W.T (F.linear), MKL reads an (out, in) weight slowly for so few rows: through its
    matrix-vector kernel for one row, and no faster for 8 rows than it would for 100. Written as (W @ x.T).T,
    the same product takes the matrix-matrix kernel that streams W at memory speed, two columns at least
    (so one row is doubled). On the 2-core EPYC of bench/generate.py, fp32: a decoding step for one sequence
    takes 4.9 ms instead of 10, for 8 sequences 11 instead of 15; a single 8192 x 512 product is 1.5-3x
    faster for 1 to 128 rows and the same from about 512 rows on. Training (autograd on), GPUs, other dtypes
    and more rows run plain F.linear. The two differ by float rounding only.
    """

    FEW_ROWS = 64  # up to this many rows take the (W @ x.T).T form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if (rows == 0 or rows > self.FEW_ROWS or torch.is_grad_enabled() or x.device.type != "cpu"
                or x.dtype != torch.float32 or self.weight.dtype != torch.float32):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows == 1:
            flat = torch.cat([flat, flat])
        y = torch.mm(self.weight, flat.t())[:, :rows].t().contiguous()   # (out, rows) -> (rows, out)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)


class KVCache:
    """Preallocated keys and values for generation: one (B, n_kv, max_len, head_dim) buffer pair per layer.

    Each forward writes its new keys/values in place at [length, length + T); `length` (tokens stored,
    padding included) advances once per forward. Nothing is allocated per decoding step.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_kv, T, head_dim) after the `length` stored tokens; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.groups = config.num_kv_groups
        self.wqkv = Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=config.bias)
        self.wo = Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, x, cos, sin, mask, is_causal, cache: KVCache | None = None, layer: int = 0,
                keep: torch.Tensor | None = None):
        """(B, T, hidden) -> (B, T, hidden); with `keep` (B, T bool) only the kept positions, (n, hidden)."""
        B, T, _ = x.shape
        G, hd = self.groups, self.head_dim
        # One matmul for q, k and v. Its output features are laid out per KV group: for each of the n_kv
        # groups, its G query heads, then its key head, then its value head (InternLM tools/convert2llama.py). Taking the
        # first n_heads * head_dim features as q would be wrong.
        qkv = self.wqkv(x).view(B, T, self.n_kv, G + 2, hd)       # (B, T, n_kv, G + 2, head_dim)
        cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)           # no-op unless autocast runs the matmul in bf16
        # Rotate the G query heads and the key head of every group in one pass; v is not rotated.
        qk = apply_rotary(qkv[:, :, :, :G + 1], cos[:, :, None, None], sin[:, :, None, None])
        q = qk[:, :, :, :G].reshape(B, T, self.n_heads, hd)      # (B, T, n_heads, head_dim); head g*G + s
        # k and v are copied out, not kept as views: attention saves them for backward, and a view would keep
        # the whole fused qkv and rotated q|k buffers alive until then (2 x hidden + kv values per token).
        k = qk[:, :, :, G].transpose(1, 2).contiguous()           # (B, n_kv, T, head_dim)
        v = qkv[:, :, :, G + 1].transpose(1, 2).contiguous()      # (B, n_kv, T, head_dim)
        q = q.transpose(1, 2)                                     # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)                      # (B, n_kv, past + T, head_dim)
            k, v = k.to(q.dtype), v.to(q.dtype)                   # no-op unless autocast changed the dtype

        if T == 1 and G > 1:
            # Decoding one token: the G query heads of a group share one key/value head, so treat them as G
            # query rows against that head; no KV repeat, no GQA path needed.
            out = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, G, hd), k, v, attn_mask=mask)
            out = out.reshape(B, self.n_heads, 1, hd)             # (B, n_kv, G, hd) -> (B, heads, T=1, hd)
        elif mask is None or q.device.type == "cpu":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=G > 1)
        else:
            # On CUDA only the flash and math kernels take enable_gqa, and flash takes no mask: repeat each
            # KV head G times (query head i uses KV head i // G) so the memory-efficient kernel runs.
            S = k.shape[2]
            k = k[:, :, None].expand(B, self.n_kv, G, S, hd).reshape(B, self.n_heads, S, hd)
            v = v[:, :, None].expand(B, self.n_kv, G, S, hd).reshape(B, self.n_heads, S, hd)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * hd)   # heads back to (B, T, hidden)
        return self.wo(out if keep is None else out[keep])           # the projection only where it is needed


class FeedForward(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = Linear(config.hidden_size, config.intermediate_size, bias=False)   # gate
        self.w3 = Linear(config.hidden_size, config.intermediate_size, bias=False)   # up
        self.w2 = Linear(config.intermediate_size, config.hidden_size, bias=False)   # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0, keep=None):
        """(B, T, hidden) -> (B, T, hidden). With `keep` (B, T bool): every position still serves as a key and
        value, but only the kept ones go on through the position-wise rest, so the result is (n kept, hidden)."""
        h = self.attention(self.attention_norm(x), cos, sin, mask, is_causal, cache, layer, keep)
        x = (x if keep is None else x[keep]) + h
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2Body(nn.Module):
    """The checkpoint's `model.*` tensors: embedding, decoder layers, final norm."""

    def __init__(self, config: InternLM2Config):
        super().__init__()
        # padding_idx as in the released model: that row (pad = </s> = 2) gets no gradient.
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# --------------------------------------------------------------------------------------------------
# The model

class InternLM2(nn.Module):
    """InternLM2ForCausalLM. Random init from a config, or `from_pretrained(dir)` for released weights."""

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.model = InternLM2Body(config)
        self.output = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The released init: normal(0, initializer_range) for linear and embedding weights, zero biases,
        a zero padding row, ones for the norms. Free on the meta device."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    # ---- checkpoints ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "InternLM2":
        """Load a released-format folder (config.json + model.safetensors or shards with an index).

        Built on the meta device and filled from the memory-mapped files, cast on the way to `dtype`
        (None keeps the checkpoint's): a bf16 checkpoint never exists as an fp32 copy. Returned in eval mode.
        """
        folder = Path(folder)
        config = load_config(folder)
        model = weights.build_on_meta(lambda: cls(config))
        weights.load_into(model, folder, key_map=KEY_MAP, ignore=IGNORE_KEYS, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write config.json and the weights in the released layout (HF key names, fused wqkv)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights.save_state(self.state_dict(), folder, max_shard_bytes=max_shard_bytes)
        config = self.config.to_dict()
        config["torch_dtype"] = str(self.output.weight.dtype).removeprefix("torch.")
        weights.write_json(config, folder / weights.CONFIG_FILE)

    # ---- forward ----------------------------------------------------------------------------------

    def set_gradient_checkpointing(self, flag: bool) -> None:
        """Recompute each decoder layer's activations in backward (only while training, without a cache)."""
        self.gradient_checkpointing = bool(flag)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        w = self.output.weight
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       dtype or w.dtype, device or w.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(input_ids)              # (B, T, hidden)

    def forward_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder layers and the final norm on (B, T, hidden) embeddings.

        attention_mask: (B, past + T), 1 = real token, 0 = padding (left padding when generating).
        position_ids:   (B, T) or (1, T); default arange(past, past + T), past = cache.length (0 without a
                        cache). With left padding pass cumsum(attention_mask) - 1 (clamped at 0).
        cache:          a `new_cache(...)`; this call appends its T tokens and advances cache.length.
        keep:           (B, T) bool, the positions whose outputs the caller needs (a loss needs the supervised
                        ones only). The last layer then runs its output projection and feed-forward, and the
                        final norm, on those positions alone, and the result is (n kept, hidden) in row-major
                        order. The other layers need every position: later ones attend to them.
        """
        B, T, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        device = inputs_embeds.device
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {past} stored + {T} new do not fit. "
                             "Create it with a larger max_len")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None]      # (1, T)
        cos, sin = rotary_tables(self.config, position_ids, inputs_embeds.dtype)
        mask, is_causal = self._attention_mask(attention_mask, B, T, past, device)

        x = inputs_embeds
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            kept = keep if i == last else None
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask, is_causal, None, i, kept, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal, cache, i, kept)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) in float32, from input_ids (B, T) or inputs_embeds (B, T, hidden)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        h = self.forward_hidden(inputs_embeds, attention_mask, position_ids, cache)
        return self.output(h).float()

    @staticmethod
    def _attention_mask(attention_mask, B, T, past, device):
        """(mask, is_causal) for scaled_dot_product_attention, built once per forward for all layers.

        No padding: the kernel's own causal masking (is_causal) when nothing is cached, no mask at all
        for a single new token. Otherwise a boolean (B, 1, T, past + T) mask, True = may attend.
        """
        S = past + T
        if attention_mask is None:
            if past == 0:
                return None, True
            if T == 1:
                return None, False
        elif attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, past + "
                             f"new tokens) = ({B}, {S})")
        # Query t sits at position past + t and sees keys 0 .. past + t.
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)     # (T, S)
        if attention_mask is None:
            return causal[None, None], False
        real = attention_mask.to(device=device, dtype=torch.bool)                          # (B, S)
        # Padding queries (whose outputs nobody reads) keep the plain causal row, so no row is empty: some
        # kernels give NaN for an all-masked row, and a NaN value times a zero weight is NaN in the next layer.
        allowed = causal & (real[:, None, :] | ~real[:, past:, None])                      # (B, T, S)
        return allowed[:, None], False                                                      # (B, 1, T, S)

"""InternLM2, the language model of LLaVA-InternLM2, in one file: start at `InternLM2`.

Llama's architecture (pre-norm, rotary, grouped-query attention, SwiGLU) with InternLM2's fused
`wqkv`, its modules named like the keys of the released checkpoints (internlm/internlm2-chat-1_8b,
-7b). References: the released `modeling_internlm2.py`; transformers' `modeling_llama.py`, which
tests/test_internlm2.py matches to 1e-4.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import LlavaMinError, weights
from .lora import merged_state_dict

# Checkpoint key -> module key: none, the modules carry the checkpoint names
KEY_MAP: list[tuple[str, str]] = []
# Some exporters save rotary tables; they are recomputed from the config
IGNORE = [r"rotary_emb\.inv_freq$"]


@dataclass
class InternLM2Config:
    """The fields of the released config.json that shape the network (same names and values)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    # {"type": "linear" | "dynamic", "factor": float >= 1} or None
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    # Biases on wqkv and wo (False in every released checkpoint)
    bias: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 2
    initializer_range: float = 0.02

    def __post_init__(self):
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        """G: query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict) -> "InternLM2Config":
        return cls(**_fields_of(dict(d)))

    def to_dict(self) -> dict:
        """The config.json form of the released files."""
        return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                **dataclasses.asdict(self),
                "hidden_act": "silu", "tie_word_embeddings": False}


# The network

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, cast back to the input dtype, THEN scale: the released code multiplies
    # the weight with the input-dtype value (InternLM2RMSNorm / LlamaRMSNorm), which is visible
    # in bf16.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class LeanRMSNorm(torch.autograd.Function):
    """`rms_norm` that keeps only its input for backward. Autograd would also keep the normalised
    copy, (..., hidden) fp32, for the weight's gradient; here backward recomputes it (one cheap
    pass) and differentiates the same ops, so the gradients are those of `rms_norm`."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            x = x.detach().requires_grad_(needs[0])
            weight = weight.detach().requires_grad_(needs[1])
            out = rms_norm(x, weight, ctx.eps)
        wanted = [t for t, need in zip((x, weight), needs) if need]
        grads = list(torch.autograd.grad(out, wanted, grad))
        # None for an input that needs no gradient, and for eps
        return *[grads.pop(0) if need else None for need in needs], None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # A trained weight: LeanRMSNorm keeps the input only. A frozen one keeps nothing more.
        if self.weight.requires_grad and torch.is_grad_enabled():
            return LeanRMSNorm.apply(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def rotary_tables(config: InternLM2Config, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of position * inv_freq, each (B or 1, T, head_dim / 2): half the released
    cat(freqs, freqs). Scaled as transformers' Llama: linear divides inv_freq; dynamic (NTK-aware)
    enlarges the base past L."""
    d = config.head_dim
    device = position_ids.device
    exponent = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d   # (d/2,)
    inv_freq = 1.0 / (config.rope_theta ** exponent)
    scaling = config.rope_scaling or {}
    if scaling.get("type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("type") == "dynamic":
        factor = scaling["factor"]
        # the trained context
        L = config.max_position_embeddings
        seq_len = position_ids.max() + 1     # a tensor: no host sync in the decoding loop
        base = config.rope_theta * ((factor * seq_len / L) - (factor - 1)) ** (d / (d - 2))
        # transformers keeps an enlarged base for later, shorter calls until one is shorter than L;
        # here each call depends on its own positions only (the same for one forward and for a
        # growing decode).
        inv_freq = torch.where(seq_len > L, 1.0 / (base ** exponent), inv_freq)
    with torch.autocast(device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq            # (B or 1, T, d/2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The released x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1), on halves
    x1, x2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Static keys and values for generation: one (B, n_kv, max_len, head_dim) buffer pair per
    layer, written in place at [length, length + T) by each forward. Nothing is allocated or copied
    per decoding step."""

    def __init__(self, c: InternLM2Config, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        layers = range(c.num_hidden_layers)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        # Tokens stored (padding included); the model advances it once per forward
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_kv, T, head_dim) after the stored tokens; return all keys and values so
        far."""
        start = self.length
        end = self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


@dataclass
class Packing:
    """Where the samples of packed rows lie in the flattened (B * T) positions: attention stays
    inside each."""
    # (n + 1,) int32 start offsets and the end; every row start is a boundary
    cu_seqlens: torch.Tensor
    max_len: int                # the longest piece (a sample, or a row's trailing padding)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> tuple["Packing", torch.Tensor]:
        """attention_mask (B, T), k > 0 on the k-th sample of a row, 0 on padding -> (Packing,
        position_ids (B, T)), the positions restarting at 0 on each sample (the trailing padding of
        a row counts as one more piece)."""
        B, T = attention_mask.shape
        seg = attention_mask.flatten()                                           # (B * T,)
        start = torch.ones_like(seg, dtype=torch.bool)
        start[1:] = seg[1:] != seg[:-1]
        # A sample never crosses rows
        start[::T] = True
        starts = start.nonzero().squeeze(1)                                      # (n,)
        cu = torch.cat([starts, starts.new_tensor([B * T])])                     # (n + 1,)
        lengths = cu.diff()
        positions = torch.arange(B * T, device=seg.device) - starts.repeat_interleave(lengths)
        return cls(cu.to(torch.int32), int(lengths.max())), positions.view(B, T)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Causal attention inside each packed piece:
    q (B, n_heads, T, hd), k, v (B, n_kv, T, hd) -> (B * T, n_heads, hd).
    CUDA in bf16 / fp16: one variable-length flash-attention call. Elsewhere (the CPU, or fp32 on
    CUDA, which varlen_attn refuses): one SDPA call per piece, exact; a dense block-diagonal mask
    computes every cross-sample score only to mask it (measured 7x slower on a CPU)."""
    B, H, T, hd = q.shape
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], hd) for t in (q, k, v))   # (B * T, heads, hd)
    groups = H // k.shape[1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # Imported here, where it runs: importing varlen loads torch's compiler stack (about a
        # second), which a CPU run, a GPU run without --pack and a command that only checks its
        # flags never need.
        from torch.nn.attention.varlen import varlen_attn
        # window_size (-1, 0): causal.
        return varlen_attn(q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_len,
                           packing.max_len, window_size=(-1, 0), enable_gqa=groups > 1)
    if q.is_cuda and groups > 1:
        # fp32 on CUDA has no flash kernel, and the memory-efficient one takes no enable_gqa
        # (SDPA would fall back to the math kernel, O(L^2) memory a piece): repeat each KV
        # head for its query heads.
        k = k.repeat_interleave(groups, dim=1)                            # (B * T, n_heads, hd)
        v = v.repeat_interleave(groups, dim=1)                            # (B * T, n_heads, hd)
    bounds = packing.cu_seqlens.tolist()
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        # One piece as a batch of one: (1, heads, L, hd), the layout of the fused kernels.
        piece = [t[s:e].transpose(0, 1)[None] for t in (q, k, v)]
        gqa = piece[1].shape[1] != H
        o = F.scaled_dot_product_attention(*piece, is_causal=True, enable_gqa=gqa)
        out.append(o[0].transpose(0, 1))                                  # (L, n_heads, hd)
    return torch.cat(out)                                                 # (B * T, n_heads, hd)


class Attention(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.groups = config.num_kv_groups
        self.wqkv = nn.Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=config.bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        """mask: a boolean (B, 1, T, S) mask, the Packing of packed rows, or None: causal (none for one token)."""
        B, T, _ = x.shape
        G, hd = self.groups, self.head_dim
        # One matmul for q, k and v. Its output features are laid out per KV group: for each of the n_kv groups,
        # its G query heads, then its key head, then its value head (InternLM's tools/convert2llama.py), so the
        # first n_heads * head_dim features are not q.
        qkv = self.wqkv(x).view(B, T, self.n_kv, G + 2, hd)       # (B, T, n_kv, G + 2, head_dim)
        cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)           # no-op unless autocast runs the matmul in bf16
        # Rotate the G query heads and the key head of every group in one pass; v is not rotated.
        qk = apply_rotary(qkv[:, :, :, :G + 1], cos[:, :, None, None], sin[:, :, None, None])
        q = qk[:, :, :, :G].reshape(B, T, self.n_heads, hd).transpose(1, 2)   # (B, n_heads, T, hd); head g*G + s
        # k and v are copied out, not kept as views: attention saves them for backward, and a view would keep
        # the whole fused qkv and rotated q|k buffers alive until then.
        k = qk[:, :, :, G].transpose(1, 2).contiguous()           # (B, n_kv, T, head_dim)
        v = qkv[:, :, :, G + 1].transpose(1, 2).contiguous()      # (B, n_kv, T, head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)                      # (B, n_kv, past + T, head_dim)
            k, v = k.to(q.dtype), v.to(q.dtype)                   # no-op unless autocast changed the dtype

        if isinstance(mask, Packing):
            return self.wo(packed_attention(q, k, v, mask).reshape(B, T, self.n_heads * hd))
        # CUDA's flash kernel takes enable_gqa, but no mask and no fp32.
        flash = mask is None and q.dtype in (torch.float16, torch.bfloat16)
        if T == 1:
            # One new token: the G query heads of a group share one key/value head, so they are G query rows
            # against that head; no KV repeat, no GQA path needed.
            out = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, G, hd), k, v, attn_mask=mask)
            out = out.reshape(B, self.n_heads, 1, hd)             # (B, n_kv, G, hd) -> (B, n_heads, 1, hd)
        elif q.device.type == "cpu" or G == 1 or flash:
            # The CPU kernels take enable_gqa, with or without a mask.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=G > 1)
        else:
            # On CUDA only the flash and math kernels take enable_gqa, and the math kernel holds
            # the (B, n_heads, T, S) scores: repeat each KV head G times (query head i uses KV
            # head i // G) so that the memory-efficient kernel runs, masked or not, in fp32 too.
            S = k.shape[2]
            k = k[:, :, None].expand(B, self.n_kv, G, S, hd).reshape(B, self.n_heads, S, hd)
            v = v[:, :, None].expand(B, self.n_kv, G, S, hd).reshape(B, self.n_heads, S, hd)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * hd))   # heads back to (B, T, hidden)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up keeping gate and up for backward, not silu(gate) too (autograd's silu and
    mul would keep all three, each (..., intermediate)); backward reuses its temporaries in place,
    so that it holds one (..., intermediate) tensor less at the step's peak."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        d_gate = (1 - sig).mul_(gate).add_(1).mul_(sig).mul_(up).mul_(grad)
        # d out / d up = silu(gate), written over sig
        d_up = sig.mul_(gate).mul_(grad)
        return d_gate, d_up


class FeedForward(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)   # gate
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)   # up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)   # down

    def forward(self, x):
        gate = self.w1(x)
        up = self.w3(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return self.w2(SwiGLU.apply(gate, up))
        return self.w2(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2(nn.Module):
    """InternLM2ForCausalLM: a random init from a config, or `from_pretrained(path)` for released
    weights."""

    # The linear layers LoRA adapts (lora.apply_lora): every one of the blocks, the fused wqkv (one
    # adapter for q, k and v, as PEFT does on InternLM2), wo and the SwiGLU. The head (`output`)
    # never gets one: its adapter would be large, and the references do not train it.
    lora_targets = ("wqkv", "wo", "w1", "w2", "w3")
    # Where a chat answer ends: <|im_end|> (92542), then </s> (2).
    stop_ids = (92542, 2)

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(   # the checkpoint's model.* tensors
            # padding_idx as in the released model: that row (pad = </s> = 2) gets no gradient.
            tok_embeddings=nn.Embedding(config.vocab_size, config.hidden_size,
                                        padding_idx=config.pad_token_id),
            layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        # Not tied to the embedding
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The released init: normal(0, initializer_range) weights, zero biases and padding row,
        unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, self.config.initializer_range)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> "InternLM2":
        """A released-format folder, in eval mode. Built on the meta device (no init), then each
        tensor is read once from the memory-mapped file to `device`, in `dtype` (None: as
        stored)."""
        config = load_config(path)
        model = weights.build_on_meta(lambda: cls(config))
        weights.load_into(model, path, key_map=KEY_MAP, ignore=IGNORE, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
        """The released layout, LoRA adapters merged in, cast to `dtype` on the way (None: as the
        parameters)."""
        state = merged_state_dict(self)
        weights.save_state(state, path, dtype=dtype, max_shard_bytes=max_shard_bytes)
        dtype = str(dtype or self.output.weight.dtype).removeprefix("torch.")
        config = self.config.to_dict() | {"torch_dtype": dtype}
        weights.write_json(config, Path(path) / weights.CONFIG_FILE)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers in order: the units of checkpointing, FSDP and FLOP counts."""
        return self.model.layers

    def set_gradient_checkpointing(self, flag: bool) -> None:
        """Recompute each decoder layer's activations in backward (only while training, without a
        cache)."""
        self.gradient_checkpointing = bool(flag)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device=None) -> KVCache:
        w = self.output.weight
        return KVCache(self.config, batch_size, max_len, dtype or w.dtype, device or w.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(input_ids)              # (B, T, hidden)

    def forward_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, hidden) embeddings -> (B, T, hidden) final-normed states.

        attention_mask: (B, past + T), 1 = real token, 0 = padding, past = cache.length (0 without
                        a cache); or for packed rows (no cache) k on a row's k-th sample, which then
                        attends to itself only, its positions restarting at 0 (position_ids ignored).
        position_ids:   (B or 1, T), default past, past + 1, ...; with left padding
                        cumsum(attention_mask) - 1.
        cache:          a `new_cache(...)`, to which this call appends its T tokens."""
        B, T, _ = inputs_embeds.shape
        past = 0
        if cache is not None:
            past = cache.length
        device = inputs_embeds.device
        if cache is not None and past + T > cache.max_len:
            raise LlavaMinError(f"KV cache holds {cache.max_len} tokens; {past} stored + {T} new do "
                                "not fit. Create it with a larger max_len")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None]      # (1, T)
        if cache is None and attention_mask is not None and bool(attention_mask.max() > 1):
            mask, position_ids = Packing.from_mask(attention_mask.to(device))
        else:
            mask = _attention_mask(attention_mask, B, T, past, device)
        cos, sin = rotary_tables(self.config, position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        training = self.training and cache is None and torch.is_grad_enabled()
        recompute = self.gradient_checkpointing and training
        for i, layer in enumerate(self.model.layers):
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask, None, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) in float32 for input_ids (B, T); the arguments as in
        `forward_hidden`."""
        hidden = self.forward_hidden(self.embed(input_ids), attention_mask, position_ids, cache)
        return self.output(hidden).float()


def _attention_mask(attention_mask, B, T, past, device):
    """The mask for scaled_dot_product_attention, once per forward: None without padding (the
    kernel's own causal masking; one new token needs none), else a boolean (B, 1, T, past + T)
    mask, True = may attend."""
    S = past + T
    if attention_mask is None and (past == 0 or T == 1):
        return None
    if attention_mask is not None and attention_mask.shape != (B, S):
        raise LlavaMinError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                            f"(batch, past + new tokens) = ({B}, {S})")
    # Query t sees keys <= past + t
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)
    if attention_mask is None:
        attention_mask = torch.ones(B, S, device=device)
    # (B, S)
    real = attention_mask.to(device).bool()
    # Padding queries (whose outputs nobody reads) keep the plain causal row, so no row is empty:
    # some kernels give NaN for an all-masked row, and a NaN value times a zero weight is NaN in
    # the next layer.
    allowed = causal & (real[:, None, :] | ~real[:, past:, None])                    # (B, T, S)
    # (B, 1, T, S)
    return allowed[:, None]


# Config files and presets

# config.json fields that describe the Hugging Face wrapper, not the network.
HF_ONLY_FIELDS = {"architectures", "auto_map", "torch_dtype", "dtype", "attn_implementation", "use_cache",
                  "transformers_version", "model_type", "_name_or_path", "pretraining_tp"}


def _fields_of(d: dict) -> dict:
    """A released config.json dict -> InternLM2Config's keyword arguments (what the released class
    reads)."""
    # Very early revisions say "internlm"
    if d.get("model_type", "internlm2") not in ("internlm2", "internlm"):
        raise LlavaMinError(f"model_type is {d['model_type']!r}, not an InternLM2 config "
                            "('internlm2')")
    if d.pop("hidden_act", "silu") != "silu":
        raise LlavaMinError("hidden_act must be 'silu' (InternLM2's SwiGLU)")
    if d.pop("tie_word_embeddings", False):
        raise LlavaMinError("tie_word_embeddings must be false (InternLM2's `output` is its own "
                            "weight)")
    if d.get("num_key_value_heads") is None and "num_attention_heads" in d:
        # The released class's default: no GQA
        d["num_key_value_heads"] = d["num_attention_heads"]
    s = d.get("rope_scaling")
    # Newer transformers' spelling
    if isinstance(s, dict) and "rope_type" in s and "type" not in s:
        d["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in s.items()}
    fields = dataclasses.fields(InternLM2Config)
    unknown = sorted(set(d) - {f.name for f in fields} - HF_ONLY_FIELDS)
    if unknown:
        raise LlavaMinError(f"unknown field {unknown[0]!r} (all unknown: {unknown}); remove it, or check the "
                            "spelling against the released internlm2 config.json")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
    if missing:
        raise LlavaMinError(f"missing field {missing[0]!r} (all missing: {missing})")
    return {f.name: d[f.name] for f in fields if f.name in d}


def _validate(c: InternLM2Config) -> None:
    def bad(field, why):
        raise LlavaMinError(f"{field} = {getattr(c, field)!r} {why}")

    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
        if type(getattr(c, field)) is not int or getattr(c, field) < 1:
            bad(field, "must be a positive integer")
    for field in ("rope_theta", "rms_norm_eps", "initializer_range"):
        if type(getattr(c, field)) not in (int, float) or not getattr(c, field) > 0:
            bad(field, "must be a positive number")
    # Rotary embeddings rotate pairs of dimensions
    if c.hidden_size % c.num_attention_heads or c.head_dim % 2:
        bad("hidden_size", f"must be divisible by num_attention_heads = {c.num_attention_heads} "
            "into an even head_dim")
    if c.num_attention_heads % c.num_key_value_heads:
        bad("num_attention_heads", f"must be divisible by num_key_value_heads = {c.num_key_value_heads}")
    s = c.rope_scaling
    known = isinstance(s, dict) and s.get("type") in ("linear", "dynamic") and len(s) == 2
    if s is not None and not known:
        bad("rope_scaling", "must be null or {'type': 'linear' | 'dynamic', 'factor': f}")
    if s is not None and not (type(s.get("factor")) in (int, float) and s["factor"] >= 1):
        bad("rope_scaling", "needs a factor >= 1")
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(c, field)
        # pad_token_id may be null
        is_id = type(value) is int and 0 <= value < c.vocab_size
        if not (value is None and field == "pad_token_id") and not is_id:
            bad(field, f"must be a token id in [0, vocab_size = {c.vocab_size})")


PRESETS: dict[str, InternLM2Config] = {
    # trains from scratch on a CPU in minutes; the released structure (GQA 2:1, dynamic NTK rope)
    "tiny": InternLM2Config(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                            rope_scaling={"type": "dynamic", "factor": 2.0}),
    # the released values (internlm/internlm2-chat-1_8b and -7b config.json)
    "internlm2-1_8b": InternLM2Config(vocab_size=92544, hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                                      rope_scaling={"type": "dynamic", "factor": 2.0}),
    "internlm2-7b": InternLM2Config(vocab_size=92544, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    rope_scaling={"type": "dynamic", "factor": 2.0}),
}


def load_config(name_or_path: str | os.PathLike) -> InternLM2Config:
    """A preset name (see PRESETS), a config.json file, or a model folder holding one."""
    return weights.load_config(name_or_path, PRESETS, InternLM2Config.from_dict, "InternLM2")


def num_parameters(config: InternLM2Config) -> int:
    """Parameter count (7,737,708,544 for internlm2-7b), counted on the meta device."""
    return weights.numel_on_meta(lambda: InternLM2(config), repr(config))

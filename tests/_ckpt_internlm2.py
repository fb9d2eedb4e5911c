"""Tiny random InternLM2 checkpoints in the released format, written without llava_min's own writer,
and the same weights as a transformers LlamaForCausalLM (the numerical reference).

    state = random_internlm2_state(config, seed=0)           # HF key names, fused grouped wqkv
    write_internlm2_checkpoint(folder, config, state, num_shards=2)
    llama = internlm2_to_llama(config, state)                # eager attention, fp32
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llava_min.internlm2 import InternLM2Config


def fuse_wqkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, n_kv: int, head_dim: int) -> torch.Tensor:
    """Separate q/k/v rows -> the released fused layout: per KV group, its G query heads, its k head, its v head."""
    rest = wq.shape[1:]                                          # (hidden,) for weights, () for biases
    G = wq.shape[0] // (n_kv * head_dim)
    q = wq.reshape(n_kv, G, head_dim, *rest)                      # (n_kv, G, head_dim, ...)
    k = wk.reshape(n_kv, 1, head_dim, *rest)
    v = wv.reshape(n_kv, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)         # (n_kv * (G + 2) * head_dim, ...)


def split_wqkv(w: torch.Tensor, n_heads: int, n_kv: int, head_dim: int):
    """The released converter's split (InternLM tools/convert2llama.py): view as (n_kv, G + 2, head_dim, ...),
    q = [:, :G], k = [:, G], v = [:, G + 1]."""
    rest = w.shape[1:]
    G = n_heads // n_kv
    w = w.reshape(n_kv, G + 2, head_dim, *rest)                   # (n_kv, G + 2, head_dim, ...)
    return (w[:, :G].reshape(n_heads * head_dim, *rest),
            w[:, G].reshape(n_kv * head_dim, *rest),
            w[:, G + 1].reshape(n_kv * head_dim, *rest))


def random_internlm2_state(config: InternLM2Config, seed: int = 0, std: float = 0.08) -> dict[str, torch.Tensor]:
    """Random fp32 tensors under the released key names. Norm weights are near 1 but not 1, so a model that
    skipped them would fail a parity test."""
    g = torch.Generator().manual_seed(seed)
    c = config
    H, V, I, hd = c.hidden_size, c.vocab_size, c.intermediate_size, c.head_dim
    qkv_rows = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd

    def rand(*shape):
        return torch.randn(*shape, generator=g) * std

    def norm():
        return 1.0 + torch.randn(H, generator=g) * 0.1

    state = {"model.tok_embeddings.weight": torch.randn(V, H, generator=g)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        state[p + "attention_norm.weight"] = norm()
        state[p + "attention.wqkv.weight"] = rand(qkv_rows, H)
        state[p + "attention.wo.weight"] = rand(H, H)
        if c.bias:
            state[p + "attention.wqkv.bias"] = rand(qkv_rows)
            state[p + "attention.wo.bias"] = rand(H)
        state[p + "ffn_norm.weight"] = norm()
        state[p + "feed_forward.w1.weight"] = rand(I, H)
        state[p + "feed_forward.w3.weight"] = rand(I, H)
        state[p + "feed_forward.w2.weight"] = rand(H, I)
    state["model.norm.weight"] = norm()
    state["output.weight"] = rand(V, H)
    return state


def released_config_dict(config: InternLM2Config) -> dict:
    """config.json as the hub files spell it, HF-only fields included."""
    c = config
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": c.bias, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "hidden_act": "silu",
        "hidden_size": c.hidden_size, "initializer_range": c.initializer_range,
        "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
        "model_type": "internlm2", "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "num_key_value_heads": c.num_key_value_heads,
        "pad_token_id": c.pad_token_id, "rms_norm_eps": c.rms_norm_eps, "rope_scaling": c.rope_scaling,
        "rope_theta": c.rope_theta, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.41.0", "use_cache": True, "vocab_size": c.vocab_size,
    }


def write_internlm2_checkpoint(folder, config: InternLM2Config, state: dict[str, torch.Tensor] | None = None,
                               num_shards: int = 2, dtype: torch.dtype | None = None,
                               config_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Write config.json and `state` (random if None) as shards + model.safetensors.index.json (or a single
    model.safetensors when num_shards == 1). Returns the state written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = random_internlm2_state(config) if state is None else state
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    (folder / "config.json").write_text(json.dumps(config_dict or released_config_dict(config), indent=2))
    keys = list(state)
    if num_shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, str(folder / "model.safetensors"))
        return state
    weight_map = {}
    per_shard = -(-len(keys) // num_shards)
    for s in range(num_shards):
        name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = keys[s * per_shard:(s + 1) * per_shard]
        save_file({k: state[k].contiguous() for k in chunk}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return state


def llama_config(config: InternLM2Config, attn_implementation: str = "eager"):
    from transformers import LlamaConfig

    c = config
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope = {"rope_type": c.rope_scaling["type"], "factor": float(c.rope_scaling["factor"]),
                "rope_theta": c.rope_theta}
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                       rms_norm_eps=c.rms_norm_eps, rope_parameters=rope, attention_bias=c.bias,
                       tie_word_embeddings=False, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                       pad_token_id=c.pad_token_id, attn_implementation=attn_implementation)


def internlm2_to_llama(config: InternLM2Config, state: dict[str, torch.Tensor], attn_implementation: str = "eager"):
    """A transformers LlamaForCausalLM holding the same weights: wqkv split as InternLM's tools/convert2llama.py does, keys renamed
    as InternLM's convert2llama.py does. Eager attention (softmax written out) by default; "sdpa" for speed."""
    from transformers import LlamaForCausalLM

    c = config
    names = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
    out = {"model.embed_tokens.weight": state["model.tok_embeddings.weight"],
           "model.norm.weight": state["model.norm.weight"], "lm_head.weight": state["output.weight"]}
    for key, t in state.items():
        if not key.startswith("model.layers."):
            continue
        _, _, i, rest = key.split(".", 3)                        # model.layers.{i}.{module}.{weight|bias}
        module, kind = rest.rsplit(".", 1)
        p = f"model.layers.{i}."
        if module == "attention.wqkv":
            q, k, v = split_wqkv(t, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
            out.update({p + f"self_attn.q_proj.{kind}": q, p + f"self_attn.k_proj.{kind}": k,
                        p + f"self_attn.v_proj.{kind}": v})
        else:
            out[p + f"{names[module]}.{kind}"] = t
    llama = LlamaForCausalLM(llama_config(config, attn_implementation))   # not on meta: its rotary buffers are not in the state
    llama.load_state_dict({k: v.float() for k, v in out.items()}, strict=True)
    return llama.eval()

"""InternLM2 (llava_min/internlm2.py) is the released model, loaded from the released checkpoint format.

Proves, on tiny random fp32 checkpoints written in the official layout (fused grouped wqkv, sharded with an
index), loaded through InternLM2.from_pretrained:
  * logits equal transformers' LlamaForCausalLM holding the split weights to 1e-4: GQA (G = 2, 4) and plain
    multi-head, wqkv/wo biases, padded batches (right and left), dynamic NTK rope past
    max_position_embeddings (also while decoding with a cache) and linear rope scaling;
  * the KV cache: incremental and chunked decoding equal the full-sequence logits, without reallocating
    the cache; a left-padded batch decodes exactly like each row alone;
  * save_pretrained -> from_pretrained is exact, in the official key names and shards; bf16 stays bf16;
  * every corrupt checkpoint (missing / unexpected / mis-shaped tensor, missing or truncated shard, bad
    config field) fails with a message naming the culprit;
  * gradient checkpointing recomputes the blocks and gives the same loss and gradients;
  * the presets have the released sizes (internlm2-7b: 7,737,708,544 parameters).
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from _ckpt_internlm2 import (internlm2_to_llama, random_internlm2_state, released_config_dict, split_wqkv,
                             write_internlm2_checkpoint)
from llava_min import LlavaMinError
from llava_min.internlm2 import PRESETS, InternLM2, InternLM2Config, load_config, num_parameters
from llava_min.weights import build_on_meta


def tiny(**over) -> InternLM2Config:
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_theta=10000.0)   # a small theta makes every rotary dimension turn within a few tokens
    fields.update(over)
    return InternLM2Config(**fields)


def load_pair(tmp_path, config, seed=0, num_shards=3):
    """(InternLM2 loaded from a sharded official checkpoint, LlamaForCausalLM with the same weights)."""
    state = write_internlm2_checkpoint(tmp_path / "ckpt", config, random_internlm2_state(config, seed),
                                       num_shards=num_shards)
    return InternLM2.from_pretrained(tmp_path / "ckpt"), internlm2_to_llama(config, state)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------------------------------
# The wqkv layout itself

def test_wqkv_split_follows_the_documented_row_formula():
    # The grouped layout (InternLM tools/convert2llama.py): row r = (g * (G + 2) + s) * head_dim + j; s < G is query head g*G + s, s = G key g,
    # s = G + 1 value g. Checked on row indices, independently of any model code.
    n_heads, n_kv, hd = 8, 2, 3
    G = n_heads // n_kv
    rows = torch.arange((n_heads + 2 * n_kv) * hd)[:, None].float()
    q, k, v = split_wqkv(rows, n_heads, n_kv, hd)
    for g in range(n_kv):
        for j in range(hd):
            for s in range(G):
                assert q[(g * G + s) * hd + j, 0] == (g * (G + 2) + s) * hd + j
            assert k[g * hd + j, 0] == (g * (G + 2) + G) * hd + j
            assert v[g * hd + j, 0] == (g * (G + 2) + G + 1) * hd + j


# --------------------------------------------------------------------------------------------------
# Parity with transformers

@pytest.mark.parametrize("name,config,T", [
    ("gqa2", tiny(), 24),
    ("gqa4-bias-linear", tiny(num_attention_heads=8, num_key_value_heads=2, bias=True,
                              rope_scaling={"type": "linear", "factor": 2.0}), 24),
    ("mha", tiny(num_key_value_heads=4), 20),
])
def test_logits_match_transformers_llama(tmp_path, name, config, T):
    model, llama = load_pair(tmp_path, config)
    ids = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), llama(ids).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, T, config.vocab_size)
    assert max_diff(ours, ref) < 1e-4, name


def test_dynamic_rope_past_max_position_embeddings_matches_transformers(tmp_path):
    config = tiny(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0})
    model, llama = load_pair(tmp_path, config)
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, ref, short = model(ids), llama(ids).logits, model(ids[:, :16])
        model.config.rope_scaling = None                     # the same weights without scaling
        unscaled, unscaled_short = model(ids), model(ids[:, :16])
    assert max_diff(ours, ref) < 1e-4
    # The test can fail: a sequence longer than 16 changes every position's logits, one of 16 does not.
    assert max_diff(unscaled, ref) > 1e-3
    assert torch.equal(short, unscaled_short)


@pytest.mark.filterwarnings("ignore:.*past_key_values")   # newer transformers renames the argument
def test_dynamic_rope_while_decoding_matches_transformers_cache(tmp_path):
    # transformers recomputes the NTK base at each step from the growing length; so must we.
    config = tiny(max_position_embeddings=8, rope_scaling={"type": "dynamic", "factor": 2.0})
    model, llama = load_pair(tmp_path, config)
    ids = torch.randint(0, config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(1, 14)
    with torch.no_grad():
        out = llama(ids[:, :5], use_cache=True)
        past, diffs = out.past_key_values, [max_diff(model(ids[:, :5], cache=cache), out.logits)]
        for t in range(5, 14):
            out = llama(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            diffs.append(max_diff(model(ids[:, t:t + 1], cache=cache), out.logits))
    assert max(diffs) < 1e-4, diffs


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(tmp_path, side):
    config = tiny()
    model, llama = load_pair(tmp_path, config)
    ids = torch.randint(0, config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(4))
    lengths = [12, 7, 3]
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, 12 - n:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=position_ids)
        ref = llama(ids, attention_mask=mask, position_ids=position_ids).logits
        alone = [model(ids[row:row + 1, mask[row].bool()]) for row in range(3)]
    real = mask.bool()
    assert not ours.isnan().any()                        # padded rows must not turn into NaN
    assert max_diff(ours[real], ref[real]) < 1e-4
    for row in range(3):                                 # and padding changes nothing for the real tokens
        assert max_diff(ours[row, real[row]], alone[row][0]) < 1e-4


def test_rms_norm_in_bf16_matches_the_released_rounding():
    # Normalise in fp32, round to bf16, then multiply by the weight (InternLM2RMSNorm): bit for bit as
    # transformers' LlamaRMSNorm, which is the released InternLM2RMSNorm.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from llava_min.internlm2 import RMSNorm
    torch.manual_seed(0)
    ours, ref = RMSNorm(64, 1e-5), LlamaRMSNorm(64, eps=1e-5)
    weight = 1 + torch.randn(64) * 0.3
    ours.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    x = (torch.randn(4, 9, 64) * 3).to(torch.bfloat16)
    assert torch.equal(ours(x), ref(x))
    scaled_in_fp32 = (weight * F.rms_norm(x.float(), (64,), eps=1e-5)).to(torch.bfloat16)
    assert not torch.equal(ours(x), scaled_in_fp32)      # the order is visible in bf16


# --------------------------------------------------------------------------------------------------
# KV cache

@pytest.mark.parametrize("kv_heads", [2, 4])
def test_cached_decoding_equals_full_sequence(kv_heads):
    torch.manual_seed(0)
    model = InternLM2(tiny(num_key_value_heads=kv_heads)).eval()
    ids = torch.randint(0, 128, (2, 12))
    cache = model.new_cache(2, 16)
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :4], cache=cache), model(ids[:, 4:7], cache=cache)]     # prefill, then a chunk
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(7, 12)]          # then one token at a time
    assert cache.length == 12
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers                       # written in place
    with pytest.raises(ValueError, match="16 tokens"):
        with torch.no_grad():
            model(ids[:, :5], cache=cache)


def test_left_padded_batch_decodes_like_each_row_alone():
    torch.manual_seed(0)
    model = InternLM2(tiny()).eval()
    prompts = [torch.randint(0, 128, (n,)) for n in (6, 2, 4)]
    width, steps = 6, 5
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    cache = model.new_cache(3, width + steps)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache)
        batched, tokens = [logits[:, -1]], []
        for _ in range(steps):
            nxt = batched[-1].argmax(-1, keepdim=True)                                # (B, 1) greedy
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            position_ids = mask.sum(-1, keepdim=True) - 1
            batched.append(model(nxt, attention_mask=mask, position_ids=position_ids, cache=cache)[:, -1])
        tokens = torch.cat(tokens, dim=1)
        for row, p in enumerate(prompts):
            single = model.new_cache(1, width + steps)
            alone = [model(p[None], cache=single)[:, -1]]
            alone += [model(tokens[row:row + 1, t:t + 1], cache=single)[:, -1] for t in range(steps)]
            assert max_diff(torch.stack([b[row] for b in batched]), torch.cat(alone)) < 1e-4, row


# --------------------------------------------------------------------------------------------------
# Saving and loading

def test_save_then_load_is_exact_in_the_official_layout(tmp_path):
    torch.manual_seed(0)
    config = tiny(bias=True)
    model = InternLM2(config)
    model.save_pretrained(tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1                                  # really sharded
    assert set(index["weight_map"]) == set(random_internlm2_state(config))            # released key names
    assert load_config(tmp_path / "out") == config
    loaded = InternLM2.from_pretrained(tmp_path / "out")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        # Equal to float rounding, not bit for bit: the loaded weights are memory-mapped at other alignments
        # (safetensors aligns to 8 bytes), and MKL's kernels round differently by alignment.
        torch.testing.assert_close(model.eval()(ids), loaded(ids), rtol=1e-6, atol=1e-6)


def test_bf16_loads_as_bf16(tmp_path):
    config = tiny()
    write_internlm2_checkpoint(tmp_path / "bf16", config, dtype=torch.bfloat16)
    write_internlm2_checkpoint(tmp_path / "fp32", config)
    for model in (InternLM2.from_pretrained(tmp_path / "bf16"),
                  InternLM2.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        logits = model(torch.randint(0, 128, (1, 5)))
        assert logits.dtype == torch.float32 and logits.isfinite().all()
    model = InternLM2.from_pretrained(tmp_path / "bf16")
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {p.dtype for p in InternLM2.from_pretrained(tmp_path / "again").parameters()} == {torch.bfloat16}


def test_save_casts_on_write_and_load_keeps_each_stored_dtype(tmp_path):
    torch.manual_seed(0)
    model = InternLM2(tiny())
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, max_shard_bytes=40_000)
    assert {p.dtype for p in model.parameters()} == {torch.float32}          # the model itself is not cast
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = InternLM2.from_pretrained(tmp_path / "bf16")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name
    # dtype=None keeps what each tensor is stored as, also in a checkpoint that mixes dtypes
    state = {k: v.to(torch.bfloat16) if "norm" in k else v for k, v in random_internlm2_state(tiny()).items()}
    write_internlm2_checkpoint(tmp_path / "mixed", tiny(), state)
    assert {k: v.dtype for k, v in InternLM2.from_pretrained(tmp_path / "mixed").state_dict().items()} == \
        {k: v.dtype for k, v in state.items()}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_files_get_the_mode_of_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        InternLM2(tiny()).save_pretrained(tmp_path, max_shard_bytes=40_000)      # shards, index, config.json
    finally:
        os.umask(old)
    files = sorted(tmp_path.iterdir())
    assert {"config.json", "model.safetensors.index.json"} < {f.name for f in files} and len(files) > 3
    assert {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~umask}, [oct(f.stat().st_mode) for f in files]


def test_rotary_buffers_in_a_checkpoint_are_ignored(tmp_path):
    config = tiny()
    state = random_internlm2_state(config)
    state["model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(config.head_dim // 2)
    write_internlm2_checkpoint(tmp_path / "c", config, state)
    InternLM2.from_pretrained(tmp_path / "c")


def _corrupt(tmp_path, config, edit_state=None, edit_files=None, config_dict=None):
    state = random_internlm2_state(config)
    if edit_state:
        edit_state(state)
    folder = tmp_path / "bad"
    write_internlm2_checkpoint(folder, config, state, num_shards=3, config_dict=config_dict)
    if edit_files:
        edit_files(folder)
    return folder


def test_missing_key_is_named(tmp_path):
    folder = _corrupt(tmp_path, tiny(), edit_state=lambda s: s.pop("model.layers.1.ffn_norm.weight"))
    with pytest.raises(LlavaMinError, match=r"missing tensor 'model\.layers\.1\.ffn_norm\.weight'"):
        InternLM2.from_pretrained(folder)


def test_unexpected_key_is_named(tmp_path):
    def add(s):
        s["model.layers.0.attention.wq.weight"] = torch.zeros(4, 4)
    folder = _corrupt(tmp_path, tiny(), edit_state=add)
    with pytest.raises(LlavaMinError, match=r"unexpected tensor 'model\.layers\.0\.attention\.wq\.weight'"):
        InternLM2.from_pretrained(folder)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    def reshape(s):
        s["model.layers.1.attention.wqkv.weight"] = torch.zeros(96, 64)   # MHA rows in a GQA config
    folder = _corrupt(tmp_path, tiny(), edit_state=reshape)
    with pytest.raises(LlavaMinError) as e:
        InternLM2.from_pretrained(folder)
    assert "model.layers.1.attention.wqkv.weight" in str(e.value)
    assert "(96, 64)" in str(e.value) and "(128, 64)" in str(e.value)


def test_missing_shard_is_named(tmp_path):
    folder = _corrupt(tmp_path, tiny(), edit_files=lambda f: (f / "model-00002-of-00003.safetensors").unlink())
    with pytest.raises(LlavaMinError, match="model-00002-of-00003.safetensors"):
        InternLM2.from_pretrained(folder)


def test_truncated_shard_is_named(tmp_path):
    def truncate(folder):
        shard = folder / "model-00003-of-00003.safetensors"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    folder = _corrupt(tmp_path, tiny(), edit_files=truncate)
    with pytest.raises(LlavaMinError, match="model-00003-of-00003.safetensors"):
        InternLM2.from_pretrained(folder)


def test_bad_config_field_is_named(tmp_path):
    config = tiny()
    bad = released_config_dict(config) | {"num_key_value_heads": 3}
    folder = _corrupt(tmp_path, config, config_dict=bad)
    with pytest.raises(LlavaMinError, match=r"config\.json: .*num_key_value_heads = 3"):
        InternLM2.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------
# Config

def test_released_config_json_reads_and_round_trips(tmp_path):
    d = released_config_dict(PRESETS["internlm2-7b"])
    (tmp_path / "config.json").write_text(json.dumps(d | {"rope_theta": 1000000}))   # an int theta, as on the hub
    config = load_config(tmp_path)
    assert config == PRESETS["internlm2-7b"] and config.head_dim == 128 and config.num_kv_groups == 4
    assert InternLM2Config.from_dict(config.to_dict()) == config
    assert load_config("tiny") == PRESETS["tiny"] and load_config("tiny") is not PRESETS["tiny"]


@pytest.mark.parametrize("field,value,words", [
    ("num_attention_heads", 6, "hidden_size = 64 must be divisible by num_attention_heads = 6"),
    ("hidden_size", -64, "hidden_size = -64 must be a positive integer"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0}, "rope_scaling = {'type': 'yarn', 'factor': 2.0} must be null or"),
    ("rope_scaling", {"type": "dynamic", "factor": 0.5}, "rope_scaling = {'type': 'dynamic', 'factor': 0.5} needs a factor >= 1"),
    ("hidden_act", "gelu", "hidden_act must be 'silu'"),
    ("num_key_valu_heads", 2, "unknown field 'num_key_valu_heads'"),
])
def test_config_errors_name_file_and_field(tmp_path, field, value, words):
    (tmp_path / "config.json").write_text(json.dumps(released_config_dict(tiny()) | {field: value}))
    with pytest.raises(LlavaMinError) as e:
        load_config(tmp_path / "config.json")
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ") and words in str(e.value)


def test_presets_have_the_released_sizes():
    assert num_parameters(PRESETS["internlm2-7b"]) == 7_737_708_544
    assert round(num_parameters(PRESETS["internlm2-1_8b"]) / 1e9, 3) == 1.889
    for name, config in PRESETS.items():       # the formula counts what the module really holds
        model = build_on_meta(lambda: InternLM2(config))
        assert sum(p.numel() for p in model.parameters()) == num_parameters(config), name
    assert num_parameters(tiny(bias=True)) == sum(p.numel() for p in InternLM2(tiny(bias=True)).parameters())


# --------------------------------------------------------------------------------------------------
# Training

def test_gradient_checkpointing_recomputes_with_same_loss_and_grads():
    torch.manual_seed(0)
    model = InternLM2(tiny()).train()
    ids = torch.randint(0, 128, (2, 16))
    calls = []
    feed_forward = model.model.layers[0].feed_forward
    run = feed_forward.forward
    feed_forward.forward = lambda x: calls.append(1) or run(x)   # (forward hooks do not fire on recompute)

    def loss_and_grads():
        model.zero_grad()
        calls.clear()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    loss_a, grads_a, calls_a = loss_and_grads()
    model.set_gradient_checkpointing(True)
    loss_b, grads_b, calls_b = loss_and_grads()
    assert (calls_a, calls_b) == (1, 2)                  # the block really ran again in backward
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-7, rtol=0), name


def test_bf16_autocast_with_fp32_weights_trains_and_decodes():
    # Mixed dtypes meet inside attention (bf16 projections, fp32 rotary tables and cache): nothing may break.
    torch.manual_seed(0)
    model = InternLM2(tiny()).train()
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    full = model(ids, attention_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, attention_mask=mask)
    assert logits.dtype == torch.float32 and max_diff(logits, full) < 0.05
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    cache = model.eval().new_cache(2, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, cache=cache)
        assert model(ids[:, :1], cache=cache).isfinite().all()

"""LoRA proves: an adapted model equals its base at initialisation (B = 0); only the adapters train; the
output head is refused; after real optimisation steps, the merged weights (in place, or as a state dict with
the official keys) give the same logits as the unmerged adapter model to 1e-5; adapters saved alone load back
exactly; a bf16 base works with fp32 adapters.

The model is a tiny causal LM with InternLM2's module names (model.layers.i.attention.wqkv, ...), so the
names and the fused wqkv matrix are those apply_lora meets in the real model.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llava_min import LlavaMinError
from llava_min.internlm2 import PRESETS, InternLM2
from llava_min.lora import LoRALinear, apply_lora, load_lora_state_dict, lora_state_dict, merge_lora, merged_state_dict

HIDDEN, HEADS, KV_HEADS, VOCAB, FFN = 32, 4, 2, 61, 48
HEAD_DIM = HIDDEN // HEADS


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        # fused grouped q/k/v, as InternLM2's wqkv: (kv_heads * (groups + 2) * head_dim, hidden)
        self.wqkv = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, KV_HEADS, HEADS // KV_HEADS + 2, HEAD_DIM)  # (B, T, kv, groups + 2, hd)
        q = qkv[..., :-2, :].reshape(B, T, HEADS, HEAD_DIM).transpose(1, 2)      # (B, heads, T, hd)
        k, v = (qkv[..., i, :].transpose(1, 2) for i in (-2, -1))                 # (B, kv, T, hd)
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, HIDDEN))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(HIDDEN, FFN, bias=False)
        self.w3 = nn.Linear(HIDDEN, FFN, bias=False)
        self.w2 = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(HIDDEN), nn.RMSNorm(HIDDEN)
        self.attention, self.feed_forward = Attention(), FeedForward()

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class TinyLM(nn.Module):
    # InternLM2's names, and like it the layers LoRA adapts by default
    lora_targets = InternLM2.lora_targets

    def __init__(self, layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.tok_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = nn.ModuleList(Block() for _ in range(layers))
        self.model.norm = nn.RMSNorm(HIDDEN)
        self.output = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        x = self.model.tok_embeddings(ids)
        for block in self.model.layers:
            x = block(x)
        return self.output(self.model.norm(x))


def make_pair(seed=0):
    """A base model and an adapted copy with identical base weights."""
    torch.manual_seed(seed)
    base = TinyLM()
    adapted = TinyLM()
    adapted.load_state_dict(base.state_dict())
    return base, adapted


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 9), generator=g)


def train_a_few_steps(model, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch()
    model.train()
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def test_adapted_model_equals_base_at_init_and_replaces_the_block_linears():
    base, adapted = make_pair()
    names = apply_lora(adapted, r=4)
    assert names == [f"model.layers.{i}.{part}" for i in range(2) for part in
                     ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")]
    assert type(adapted.output) is nn.Linear  # the head is never adapted
    ids = batch()
    adapted.train()  # dropout active: still exact, B = 0 cancels the adapter path
    assert torch.equal(adapted(ids), base(ids))

    layer = adapted.model.layers[0].attention.wqkv
    assert layer.scaling == 2.0 and layer.alpha == 8  # alpha defaults to 2 r
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(HIDDEN)  # kaiming_uniform(a=sqrt(5)) on (r, in) is U(-1/sqrt(in), 1/sqrt(in))
    assert 0 < layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4


def test_only_adapters_are_trainable_and_base_tensors_are_shared():
    _, model = make_pair()
    wqkv_before = model.model.layers[1].attention.wqkv.weight
    apply_lora(model, r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 5 * 2 and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert model.model.layers[1].attention.wqkv.weight is wqkv_before  # no copy of the base weight
    keys = set(model.state_dict())
    official = set(TinyLM().state_dict())
    assert official <= keys and {k for k in keys - official} == {
        f"model.layers.{i}.{m}.{ab}" for i in range(2) for m in
        ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
        for ab in ("lora_A", "lora_B")}


def test_output_head_and_bad_targets_are_refused():
    _, model = make_pair()
    with pytest.raises(LlavaMinError, match="output head 'output'"):
        apply_lora(model, r=4, targets=("wqkv", "output"))
    assert type(model.model.layers[0].attention.wqkv) is nn.Linear  # nothing was half-applied
    with pytest.raises(LlavaMinError, match="no nn.Linear .* ends with any of \\['q_proj'\\]"):
        apply_lora(model, r=4, targets=("q_proj",))
    with pytest.raises(LlavaMinError, match="model.layers.0.attention matches a LoRA target but is a Attention"):
        apply_lora(model, r=4, targets=("attention",))
    with pytest.raises(LlavaMinError, match="positive integer"):
        apply_lora(model, r=0)
    apply_lora(model, r=4, targets=("wo",))
    with pytest.raises(LlavaMinError, match="already has a LoRA adapter"):
        apply_lora(model, r=4, targets=("wo",))


def test_merged_weights_give_the_adapter_models_logits_after_training():
    base, adapted = make_pair()
    apply_lora(adapted, r=4, alpha=8, dropout=0.05)
    train_a_few_steps(adapted)
    ids = batch(seed=7)
    with torch.no_grad():
        want = adapted(ids)
        assert (want - base(ids)).abs().max() > 1e-2  # training changed the model: the checks below can fail

        # 1) a state dict with the official keys, the module left as it was
        state = merged_state_dict(adapted)
        assert set(state) == set(TinyLM().state_dict())
        assert isinstance(adapted.model.layers[0].attention.wqkv, LoRALinear)
        fresh = TinyLM()
        fresh.load_state_dict(state, strict=True)
        torch.testing.assert_close(fresh.eval()(ids), want, atol=1e-5, rtol=0)

        # 2) in place: plain nn.Linear again, official keys only
        merged = merge_lora(adapted)
        assert len(merged) == 10
        assert not any(isinstance(m, LoRALinear) for m in adapted.modules())
        assert all(type(adapted.get_submodule(name)) is nn.Linear for name in merged)
        assert set(adapted.state_dict()) == set(TinyLM().state_dict())
        torch.testing.assert_close(adapted(ids), want, atol=1e-5, rtol=0)


def test_adapters_saved_alone_load_back_exactly():
    _, trained = make_pair()
    apply_lora(trained, r=4)
    train_a_few_steps(trained, steps=3)
    saved = {k: v.clone() for k, v in lora_state_dict(trained).items()}
    assert len(saved) == 20 and all(k.endswith((".lora_A", ".lora_B")) for k in saved)

    _, resumed = make_pair()  # the same base weights; fresh, different adapters
    torch.manual_seed(123)
    apply_lora(resumed, r=4)
    load_lora_state_dict(resumed, saved)
    ids = batch(seed=3)
    with torch.no_grad():
        assert torch.equal(resumed.eval()(ids), trained(ids))

    _, other_rank = make_pair()
    apply_lora(other_rank, r=2)
    with pytest.raises(LlavaMinError, match=r"model.layers.0.attention.wqkv.lora_A' has shape \(4, 32\)"):
        load_lora_state_dict(other_rank, saved)
    _, fewer = make_pair()
    apply_lora(fewer, r=4, targets=("wqkv",))
    with pytest.raises(LlavaMinError, match="unexpected .*attention.wo.lora_A"):
        load_lora_state_dict(fewer, saved)


def test_bf16_base_with_fp32_adapters():
    torch.manual_seed(0)
    base = nn.Linear(HIDDEN, 16, bias=True).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, HIDDEN, dtype=torch.bfloat16)
    y = layer(x)  # bf16 activations without autocast: the adapter runs in fp32, the sum comes back in bf16
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_A.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.float()).dtype == torch.bfloat16
    merged = layer.merged_weight()
    assert merged.dtype == torch.bfloat16
    expected = base.weight.float() + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(merged.float(), expected, atol=0, rtol=2 ** -8)  # one bf16 rounding



def test_internlm2_saves_merged_official_keys_and_merges_back_to_nn_linear(tmp_path):
    torch.manual_seed(0)
    llm = InternLM2(PRESETS["tiny"])
    names = apply_lora(llm, r=2)
    llm.eval()                                                # no adapter dropout
    assert names and all(type(llm.get_submodule(n)) is LoRALinear for n in names)
    with torch.no_grad():
        for n in names:
            llm.get_submodule(n).lora_B.normal_(std=0.05)      # a trained adapter: merging changes the weights
    ids = torch.randint(0, 2048, (1, 7))
    with torch.no_grad():
        want = llm(ids)
        llm.save_pretrained(tmp_path)                         # the official keys, adapters folded in
        torch.testing.assert_close(InternLM2.from_pretrained(tmp_path)(ids), want, atol=1e-5, rtol=0)
    merge_lora(llm)
    assert all(type(llm.get_submodule(n)) is nn.Linear for n in names)

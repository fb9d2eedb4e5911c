"""CLIP vision tower parity with transformers, through llava_min's own loading and saving code.

Proves that CLIP checkpoints written by transformers, vision-only (CLIPVisionModel, no key prefix) or the full
model with a text tower (CLIPModel: vision_model.*, text_model.*, projections, logit_scale, a nested
vision_config), load into llava_min.clip.CLIP, which then gives every hidden state and the last one (1e-4, fp32),
at the stored grid and with position interpolation; that a full checkpoint names what it left unread; that
features(layer) is hidden_states()[layer] without CLS; that our save loads in transformers' CLIPVisionModel
with no key missing or unexpected; that LLaVA on a CLIP tower equals LlavaForConditionalGeneration (layer -2,
"default": CLS dropped); that gradient checkpointing changes nothing; and that the presets match transformers'
parameter counts.
"""
import pytest
import torch

from _ckpt_clip import hf_clip_config, write_tiny_clip
from _ckpt_llava import expand_image_tokens, write_tiny_llava
from llava_min import IMAGE_TOKEN_INDEX as IMG
from llava_min.clip import CLIP, PRESETS, num_parameters
from llava_min.internlm2 import InternLM2Config
from llava_min.llava import LLaVA


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("full", [False, True], ids=["vision-only", "full-model"])
def test_matches_transformers(tmp_path, capfd, full):
    ref = write_tiny_clip(tmp_path, full=full)
    capfd.readouterr()
    ours = CLIP.from_pretrained(tmp_path)
    said = capfd.readouterr().err
    if full:
        assert "left unread: logit_scale, text_model.* (20 tensors), text_projection.weight, visual_projection" in said
    else:
        assert "left unread" not in said
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        states = ours.hidden_states(x)
        assert len(states) == len(out.hidden_states) == 4
        for a, b in zip(states, out.hidden_states):
            assert a.shape == b.shape == (2, 1 + 4, 32)
            assert max_diff(a, b) < 1e-4
        assert max_diff(ours(x), out.last_hidden_state) < 1e-4
        assert max_diff(ours.features(x, layer=-2), out.hidden_states[-2][:, 1:]) < 1e-4
        assert torch.equal(ours.features(x, layer=-2), states[-2][:, 1:])


@pytest.mark.parametrize("size", [(42, 42), (28, 56), (14, 14)])
def test_position_interpolation_matches_transformers(tmp_path, size):
    ref = write_tiny_clip(tmp_path)
    ours = CLIP.from_pretrained(tmp_path)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
        assert max_diff(ours(x), out.last_hidden_state) < 1e-4


def test_save_loads_in_transformers(tmp_path):
    from transformers import CLIPVisionModel

    write_tiny_clip(tmp_path / "hub", full=True)
    ours = CLIP.from_pretrained(tmp_path / "hub")
    ours.save_pretrained(tmp_path / "ours")
    theirs, info = CLIPVisionModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert max_diff(ours(x), theirs(pixel_values=x).last_hidden_state) < 1e-4
    assert torch.equal(CLIP.from_pretrained(tmp_path / "ours")(x), ours(x))


def test_gradient_checkpointing_changes_nothing(tmp_path):
    write_tiny_clip(tmp_path)
    x = torch.randn(2, 3, 28, 28)
    grads = []
    for flag in (False, True):
        vit = CLIP.from_pretrained(tmp_path)
        vit.set_gradient_checkpointing(flag)
        vit.features(x).square().sum().backward()
        grads.append(vit.blocks[0].mlp.fc1.weight.grad)
    assert grads[0].abs().max() > 0 and torch.equal(grads[0], grads[1])


def test_llava_on_clip_matches_transformers(tmp_path):
    llm = InternLM2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = write_tiny_llava(tmp_path, llm, tower="clip", image_token_id=95)
    model = LLaVA.from_pretrained(llm=tmp_path / "llm", vit=tmp_path / "vit", projector=tmp_path / "projector")
    assert isinstance(model.vit, CLIP)
    input_ids = torch.tensor([[1, 5, IMG, 7, 8, 9], [1, 21, IMG, 23, 24, 0]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
    labels = input_ids.masked_fill(mask == 0, -100).masked_fill(input_ids == IMG, -100)
    x = torch.randn(2, 3, 28, 28)
    out = model(input_ids, x, labels=labels, attention_mask=mask)
    hf_ids, hf_mask, hf_labels = expand_image_tokens(input_ids, mask, 4, 95, labels)
    with torch.no_grad():
        ref = hf(input_ids=hf_ids, pixel_values=x, attention_mask=hf_mask, labels=hf_labels)
    real = out.attention_mask.bool()
    assert max_diff(out.logits[real], ref.logits[hf_mask.bool()]) < 1e-4
    assert abs(out.loss.item() - ref.loss.item()) < 1e-4


@pytest.mark.parametrize("name", PRESETS)
def test_presets_count_as_transformers(name):
    from transformers import CLIPVisionModel

    c = PRESETS[name]
    config = hf_clip_config(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                            image_size=c.image_size, patch_size=c.patch_size)
    config.intermediate_size = c.intermediate_size
    with torch.device("meta"):
        theirs = sum(p.numel() for p in CLIPVisionModel(config).parameters())
    assert num_parameters(c) == theirs

"""DINOv2 parity with transformers, through llava_min's own loading and saving code.

Proves that hub-format checkpoints written by transformers (Dinov2Model, Dinov2WithRegistersModel, the SwiGLU
giant layout) load into llava_min.dinov2.DINOv2 and give the same final output and every hidden state (1e-4,
fp32) on square and non-square images, at the stored grid and with position-embedding interpolation up and down;
that features() is hidden_states()[layer] without the prefix tokens and stops after the blocks it needs; that our
save_pretrained output loads in transformers unchanged; that gradient checkpointing changes nothing; that the
presets, num_parameters and config validation agree with transformers and name the culprit when wrong.
"""
import json

import pytest
import torch

from _ckpt_dinov2 import hf_dinov2, write_tiny_dinov2
from llava_min.dinov2 import DINOv2, DINOv2Config, Embeddings, PRESETS, load_config, num_parameters
from llava_min import LlavaMinError
from llava_min.weights import build_on_meta

# (height, width): the stored 3x3 grid; larger and smaller squares (interpolation up / down); non-square; and
# 1x9 patches, which has the stored patch count but must still be interpolated (transformers checks H == W).
SIZES = [(42, 42), (56, 56), (28, 28), (28, 56), (14, 126)]
VARIANTS = {"plain": dict(), "registers": dict(registers=4), "giant": dict(swiglu=True),
            "giant-reg": dict(swiglu=True, registers=4)}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers(tmp_path, variant):
    ref = write_tiny_dinov2(tmp_path, **VARIANTS[variant])
    ours = DINOv2.from_pretrained(tmp_path)
    assert ours.num_prefix_tokens == 1 + VARIANTS[variant].get("registers", 0)
    torch.manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            out = ref(pixel_values=x, output_hidden_states=True)
            states = ours.hidden_states(x)
            final = ours(x)
        assert len(states) == len(out.hidden_states) == ref.config.num_hidden_layers + 1
        for i, (a, b) in enumerate(zip(states, out.hidden_states)):
            assert a.shape == b.shape == (2, ours.num_prefix_tokens + (h // 14) * (w // 14), 32), (h, w, i)
            _close(a, b)
        _close(final, out.last_hidden_state)


def test_interpolation_antialias_only_for_registers():
    """The registers variant antialiases when it resizes the position grid and the plain one does not, so the
    parity test above fails if either uses the other's rule; at the stored square grid nothing is resized."""
    pos = torch.randn(1, 10, 8)

    def interpolate(registers, size):
        config = DINOv2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, image_size=42,
                              num_register_tokens=registers)
        embeddings = Embeddings(config)
        with torch.no_grad():
            embeddings.position_embeddings.copy_(pos)
        return embeddings.interpolate_pos_encoding(size, size)

    assert not torch.allclose(interpolate(0, 28), interpolate(4, 28), atol=1e-3)
    assert not torch.allclose(interpolate(0, 56), interpolate(4, 56), atol=1e-3)
    assert torch.equal(interpolate(0, 56)[:, 0], pos[:, 0])   # the CLS position is never resized
    assert torch.equal(interpolate(4, 42), pos)


def test_features_drop_prefix_and_stop_early(tmp_path):
    write_tiny_dinov2(tmp_path, registers=4, layers=3)
    vit = DINOv2.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        states = vit.hidden_states(x)
        for layer in (-2, -1, 0, 3, -4):
            torch.testing.assert_close(vit.features(x, layer=layer), states[layer][:, 5:], rtol=0, atol=0)
        ran = []
        hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(vit.encoder.layer)]
        vit.features(x)  # layer -2 of 3 blocks: blocks 0 and 1 only
        for hook in hooks:
            hook.remove()
    assert ran == [0, 1]
    assert vit.features(x).shape == (2, (28 // 14) * (42 // 14), 32) == (2, 6, 32)
    with pytest.raises(ValueError, match="layer 4 is out of range .* 3 blocks"):
        vit.features(x, layer=4)


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import AutoModel

    for config in (DINOv2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=42),
                   DINOv2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                                use_swiglu_ffn=True, num_register_tokens=2, layerscale_value=0.5)):
        torch.manual_seed(0)
        ours = DINOv2(config)
        folder = tmp_path / f"registers-{config.num_register_tokens}"
        ours.save_pretrained(folder)
        ref, info = AutoModel.from_pretrained(folder, output_loading_info=True, attn_implementation="eager")
        assert not any(info.values()), info            # no missing, unexpected or mismatched keys
        assert type(ref).__name__ == ("Dinov2WithRegistersModel" if config.num_register_tokens else "Dinov2Model")
        x = torch.randn(1, 3, 56, 28)
        with torch.no_grad():
            _close(ours(x), ref(pixel_values=x).last_hidden_state)
        again = DINOv2.from_pretrained(folder)         # and back into ours, bit for bit
        assert again.config == config
        for k, v in ours.state_dict().items():
            assert torch.equal(v, again.state_dict()[k]), k


def test_gradient_checkpointing_same_outputs_and_grads(tmp_path):
    write_tiny_dinov2(tmp_path, registers=4)
    results = []
    for flag in (False, True):
        vit = DINOv2.from_pretrained(tmp_path).train()
        vit.set_gradient_checkpointing(flag)
        calls = []
        vit.encoder.layer[0].norm1.register_forward_hook(lambda *args: calls.append(1))
        x = torch.randn(2, 3, 42, 28, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = vit(x)
        (out.square().mean() + vit.features(x).sum()).backward()
        assert len(calls) == (4 if flag else 2)      # checkpointing reruns the block's start in backward
        results.append((out.detach(), x.grad, {n: p.grad for n, p in vit.named_parameters()}))
    (out0, gx0, g0), (out1, gx1, g1) = results
    torch.testing.assert_close(out0, out1, rtol=0, atol=0)
    torch.testing.assert_close(gx0, gx1)
    assert g0.keys() == g1.keys() and all(g0[n] is not None for n in g0)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], msg=n)


def test_bfloat16_load(tmp_path):
    write_tiny_dinov2(tmp_path)
    vit = DINOv2.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in vit.state_dict().values()} == {torch.bfloat16}
    assert vit(torch.randn(1, 3, 28, 28)).dtype == torch.bfloat16


def test_image_size_not_multiple_of_patch(tmp_path):
    vit = DINOv2(load_config("tiny"))
    with pytest.raises(ValueError, match="height 30 and width 28 .* patch size 14"):
        vit(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="height 28 and width 50 .* patch size 14"):
        vit.features(torch.randn(1, 3, 28, 50))


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "tiny"])
def test_presets_match_transformers_shapes(name):
    """Each preset, written as config.json and built by transformers on the meta device, has our keys and shapes,
    and num_parameters counts them."""
    from transformers import AutoConfig, AutoModel

    config = PRESETS[name]
    hf_config = AutoConfig.for_model(**config.to_dict())
    with torch.device("meta"):
        hf = AutoModel.from_config(hf_config)
    ours = build_on_meta(lambda: DINOv2(config))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    # transformers 5 names q/k/v o_proj and splits weights_in inside the module; the hub names come back on save
    assert sum(v.numel() for v in hf.state_dict().values()) == num_parameters(config)
    assert sum(v.numel() for v in ours.state_dict().values()) == num_parameters(config)
    assert hf_shapes["embeddings.position_embeddings"] == (1, 37 * 37 + 1, config.hidden_size)


def test_preset_sizes():
    assert round(num_parameters(PRESETS["dinov2-large"]) / 1e6) == 304
    assert round(num_parameters(PRESETS["dinov2-giant"]) / 1e6) == 1136
    assert PRESETS["dinov2-giant"].ffn_hidden_size == 4096
    assert PRESETS["dinov2-base-reg"].num_register_tokens == 4
    tiny = DINOv2(load_config("tiny"))
    assert sum(t.numel() for t in tiny.state_dict().values()) == num_parameters(tiny.config)


def test_load_config_from_file_and_folder(tmp_path):
    hf = write_tiny_dinov2(tmp_path, registers=4, swiglu=True)
    for where in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        config = load_config(where)
        assert (config.hidden_size, config.num_register_tokens, config.use_swiglu_ffn) == (32, 4, True)
    assert config.to_dict()["model_type"] == hf.config.model_type == "dinov2_with_registers"
    with pytest.raises(LlavaMinError, match="neither a DINOv2 preset"):
        load_config("dinov2-huge")


def test_config_errors_name_field_and_file(tmp_path):
    file = tmp_path / "config.json"
    good = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    for change, culprit in [({"hidden_size": 30}, "hidden_size = 30 must be divisible by num_attention_heads"),
                            ({"num_hidden_layers": 0}, "num_hidden_layers = 0 must be a positive integer"),
                            ({"hidden_act": "mish"}, "hidden_act = 'mish' is not supported"),
                            ({"model_type": "clip_vision_model"}, "model_type 'clip_vision_model' is not a DINOv2"),
                            ({"image_size": [28, 42]}, r"image_size = \[28, 42\]: only square")]:
        file.write_text(json.dumps({**good, **change}))
        with pytest.raises(LlavaMinError, match=culprit) as e:
            load_config(file)
        assert str(file) in str(e.value)
    file.write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4}))
    with pytest.raises(LlavaMinError, match="missing field 'num_hidden_layers'"):
        load_config(file)
    # fields a hub config omits take transformers' defaults for its model_type
    file.write_text(json.dumps({"model_type": "dinov2_with_registers", **{k: good[k] for k in list(good)[1:]}}))
    config = load_config(file)
    assert (config.image_size, config.patch_size, config.num_register_tokens) == (224, 16, 4)


def test_corrupt_checkpoint_names_key_and_file(tmp_path):
    from safetensors.torch import load_file, save_file

    write_tiny_dinov2(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    tensors["encoder.layer.1.mlp.fc1.weight"] = tensors["encoder.layer.1.mlp.fc1.weight"][:, :16].contiguous()
    save_file(tensors, weights)
    with pytest.raises(LlavaMinError, match=r"model.safetensors: tensor 'encoder.layer.1.mlp.fc1.weight' has "
                                              r"shape \(128, 16\) .* \(128, 32\)"):
        DINOv2.from_pretrained(tmp_path)
    del tensors["encoder.layer.1.mlp.fc1.weight"]
    save_file(tensors, weights)
    with pytest.raises(LlavaMinError, match="missing tensor 'encoder.layer.1.mlp.fc1.weight'"):
        DINOv2.from_pretrained(tmp_path)


def test_loads_image_classification_checkpoint(tmp_path):
    """Dinov2ForImageClassification nests the backbone under "dinov2." beside a classifier head: the backbone
    loads and the head is left alone."""
    from transformers import Dinov2ForImageClassification

    ref = hf_dinov2()
    classifier = Dinov2ForImageClassification(ref.config)
    classifier.dinov2.load_state_dict(ref.state_dict())
    classifier.save_pretrained(tmp_path)
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        _close(DINOv2.from_pretrained(tmp_path)(x), ref(pixel_values=x).last_hidden_state)

"""Projector checkpoints in XTuner's and HF LLaVA's namings load into llava_min.projector.Projector and compute
what their reference modules compute (XTuner's nn.Sequential, transformers' LlavaMultiModalProjector); sizes come
from config.json or, without it, from the tensor shapes; save_pretrained writes XTuner's form and reads back
exactly; a folder mixing the two namings, and corrupt or mismatched checkpoints, raise errors that name the key
and the file.
"""
import json

import pytest
import torch

from _ckpt_dinov2 import randomise_, write_tiny_projector
from llava_min.projector import Projector
from llava_min import LlavaMinError


def _features():
    return torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("names", ["xtuner", "xtuner-prefixed", "hf", "hf-prefixed"])
@pytest.mark.parametrize("config", [True, False])
def test_loads_every_naming(tmp_path, names, config):
    reference = write_tiny_projector(tmp_path, 32, 48, names=names, config=config)
    proj = Projector.from_pretrained(tmp_path)
    assert (proj.vision_hidden, proj.llm_hidden, proj.depth, proj.bias) == (32, 48, 2, True)
    x = _features()
    with torch.no_grad():
        torch.testing.assert_close(proj(x), reference(x), rtol=1e-4, atol=1e-4)


def test_matches_transformers_llava_projector(tmp_path):
    from safetensors.torch import save_file
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(vision_config=Dinov2Config(hidden_size=32), text_config=LlamaConfig(hidden_size=48, num_attention_heads=4))
    hf = LlavaMultiModalProjector(config)
    randomise_(hf, scale=0.3)
    # as a full LLaVA checkpoint names them (the projector's tensors only)
    save_file({f"multi_modal_projector.{k}": v.contiguous() for k, v in hf.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    proj = Projector.from_pretrained(tmp_path)
    x = _features()
    with torch.no_grad():
        torch.testing.assert_close(proj(x), hf(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_save_load_round_trip_in_xtuner_form(tmp_path, depth):
    torch.manual_seed(0)
    proj = Projector(32, 48, depth=depth)
    proj.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"architectures": ["ProjectorModel"], "model_type": "projector", "visual_hidden_size": 32,
                      "llm_hidden_size": 48, "depth": depth, "hidden_act": "gelu", "bias": True}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(f"model.{2 * i}.{p}" for i in range(depth) for p in ("weight", "bias"))
    again = Projector.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert again.depth == depth and next(again.parameters()).dtype == torch.bfloat16
    for k, v in proj.state_dict().items():
        assert torch.equal(v.to(torch.bfloat16), again.state_dict()[k]), k
    # and the sizes are recovered from the shapes alone
    (tmp_path / "config.json").unlink()
    assert (Projector.from_pretrained(tmp_path).depth, Projector.from_pretrained(tmp_path).llm_hidden) == (depth, 48)


def test_reference_sequential_matches_deeper_xtuner(tmp_path):
    reference = write_tiny_projector(tmp_path, 32, 48, depth=3)
    x = _features()
    with torch.no_grad():
        torch.testing.assert_close(Projector.from_pretrained(tmp_path)(x), reference(x), rtol=1e-4, atol=1e-4)


def test_mixed_names_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    write_tiny_projector(tmp_path, names="xtuner")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["linear_2.weight"] = tensors.pop("model.2.weight")
    save_file(tensors, file)
    with pytest.raises(LlavaMinError, match="mixes (HF LLaVA|XTuner) names") as e:
        Projector.from_pretrained(tmp_path)
    assert str(file) in str(e.value) and "'linear_2.weight'" in str(e.value) and "'model.0." in str(e.value)


def test_corrupt_checkpoints_name_key_and_file(tmp_path):
    from safetensors.torch import load_file, save_file

    write_tiny_projector(tmp_path)
    file = tmp_path / "model.safetensors"
    good = load_file(file)

    save_file({**good, "model.2.weight": torch.zeros(48, 40)}, file)
    with pytest.raises(LlavaMinError, match=r"model.safetensors: tensor 'model.2.weight' has shape \(48, 40\) "
                                              r".* \(48, 48\)"):
        Projector.from_pretrained(tmp_path)

    save_file({k: v for k, v in good.items() if k != "model.2.bias"}, file)
    with pytest.raises(LlavaMinError, match=f"{tmp_path}: missing tensor 'model.2.bias'"):
        Projector.from_pretrained(tmp_path)

    save_file({**good, "model.1.weight": torch.zeros(48)}, file)
    with pytest.raises(LlavaMinError, match="model.safetensors: unexpected tensor 'model.1.weight'"):
        Projector.from_pretrained(tmp_path)

    save_file(good, file)
    config = tmp_path / "config.json"
    settings = json.loads(config.read_text())
    for change, culprit in [({"llm_hidden_size": 64}, r"tensor 'model.0.(weight|bias)' has shape \(48"),
                            ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
                            ({"depth": 0}, "depth must be a positive integer"),
                            ({"model_type": "llava"}, "model_type 'llava' is not an XTuner projector config")]:
        config.write_text(json.dumps({**settings, **change}))
        with pytest.raises(LlavaMinError, match=culprit) as e:
            Projector.from_pretrained(tmp_path)
        assert tmp_path.name in str(e.value)

    config.unlink()
    save_file({"vision_tower.weight": torch.zeros(2, 2)}, file)
    with pytest.raises(LlavaMinError, match="model.safetensors: no first projector layer"):
        Projector.from_pretrained(tmp_path)

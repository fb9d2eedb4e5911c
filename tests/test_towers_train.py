"""train.py with each vision tower, end to end: --vit-config tiny-clip / tiny-siglip, as users run it.

Proves, for CLIP and SigLIP: stage 1 picks the tower from the preset, trains every part (`--train all`, so the
tower's freeze_unused, gradient checkpointing and packing all run) with the same losses with and without
gradient checkpointing, writes OUT/vit in the tower's hub format (transformers' vision model loads it without a
missing or unexpected key), and OUT loads with LLaVA.from_pretrained as that tower.
"""
import json
from pathlib import Path

import pytest
import torch

from llava_min.clip import CLIP
from llava_min.llava import LLaVA
from llava_min.siglip import SigLIP
from test_train import PY, losses, run, shapes, stage1_args  # noqa: F401  (shapes: the data set fixture)

TOWERS = {"tiny-clip": (CLIP, "clip_vision_model", "CLIPVisionModel"),
          "tiny-siglip": (SigLIP, "siglip_vision_model", "SiglipVisionModel")}


@pytest.mark.parametrize("preset", TOWERS)
def test_train_with_the_tower(shapes, tmp_path, preset):
    import transformers

    tower, model_type, hf_class = TOWERS[preset]
    common = ["--vit-config", preset, "--train", "all", "--max-steps", "2", "--batch-size", "8", "--pack", "128"]
    run([PY, *stage1_args(shapes, tmp_path / "plain", *common)])
    run([PY, *stage1_args(shapes, tmp_path / "ckpt", *common, "--grad-checkpointing")])
    plain = losses(tmp_path / "plain")
    assert len(plain) == 2 and all(torch.isfinite(torch.tensor(plain)))
    assert losses(tmp_path / "ckpt") == pytest.approx(plain, abs=1e-6)

    out = tmp_path / "plain"
    assert json.loads((out / "vit" / "config.json").read_text())["model_type"] == model_type
    model = LLaVA.from_pretrained(out)
    assert isinstance(model.vit, tower)
    theirs, info = getattr(transformers, hf_class).from_pretrained(Path(out) / "vit", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        hidden = theirs(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
        assert (model.vit.features(x) - hidden[-2][:, model.vit.config.prefix_tokens:]).abs().max() < 1e-4

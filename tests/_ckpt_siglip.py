"""Tiny random SigLIP vision towers in the official formats, for tests: written by transformers itself.

    ref = write_tiny_siglip(folder)              # SiglipVisionModel.save_pretrained: no prefix, with its head
    ref = write_tiny_siglip(folder, full=True)   # SiglipModel.save_pretrained: vision_model.*, text_model.*, ...

Either returns the SiglipVisionModel holding the tower's weights (the reference). Every tensor is randomised.
"""
from __future__ import annotations

import torch

from _ckpt_dinov2 import randomise_


def hf_siglip_config(hidden: int = 32, layers: int = 3, heads: int = 4, image_size: int = 28, patch_size: int = 14,
                     head: bool = True):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                              vision_use_head=head, attn_implementation="eager")


def hf_siglip(seed: int = 0, **kw):
    """A transformers SiglipVisionModel with random weights, eager attention, in eval mode."""
    from transformers import SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(hf_siglip_config(**kw))
    randomise_(model, seed)
    return model.eval()


def write_tiny_siglip(folder, full: bool = False, seed: int = 0, **kw):
    """Save a random SigLIP tower to folder (vision-only, or inside a full SiglipModel with a text tower); returns
    the SiglipVisionModel with the same tower weights."""
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig

    vision = hf_siglip(seed, **kw)
    if not full:
        vision.save_pretrained(folder)
        return vision
    text = SiglipTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.config.to_dict()))
    randomise_(model, seed + 1)
    model.vision_model.load_state_dict(vision.state_dict())
    model.save_pretrained(folder)
    return vision

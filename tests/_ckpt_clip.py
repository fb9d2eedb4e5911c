"""Tiny random CLIP vision towers in the official formats, for tests: written by transformers itself.

    ref = write_tiny_clip(folder)              # CLIPVisionModel.save_pretrained: vision-only keys, no prefix
    ref = write_tiny_clip(folder, full=True)   # CLIPModel.save_pretrained: vision_model.*, text_model.*, ...

Either returns the CLIPVisionModel holding the tower's weights (the reference). Every tensor is randomised
(norms and biases included) so that a swapped or ignored tensor shows up in the outputs.
"""
from __future__ import annotations

import torch

from _ckpt_dinov2 import randomise_


def hf_clip_config(hidden: int = 32, layers: int = 3, heads: int = 4, image_size: int = 28, patch_size: int = 14):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                            attn_implementation="eager")


def hf_clip(seed: int = 0, **kw):
    """A transformers CLIPVisionModel with random weights, eager attention, in eval mode."""
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(hf_clip_config(**kw))
    randomise_(model, seed)
    return model.eval()


def write_tiny_clip(folder, full: bool = False, seed: int = 0, **kw):
    """Save a random CLIP tower to folder (vision-only, or inside a full CLIPModel with a text tower); returns
    the CLIPVisionModel with the same tower weights."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    vision = hf_clip(seed, **kw)
    if not full:
        vision.save_pretrained(folder)
        return vision
    text = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.config.to_dict()))
    randomise_(model, seed + 1)
    model.vision_model.load_state_dict(vision.state_dict())
    model.save_pretrained(folder)
    return vision

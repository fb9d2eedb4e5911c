"""llava-min: a minimal, pure-PyTorch LLaVA-InternLM2 (a ViT -> MLP projector -> InternLM2).

Reading order: internlm2.py, dinov2.py (clip.py, siglip.py: the other towers), projector.py,
llava.py, then tokenizer.py, data.py, image.py, loader.py, and the two training scripts at the
repository root.

The public classes are imported on first use (PEP 562), so `python -m llava_min.data check` or a loader
worker does not pay for modules it never touches.
"""
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids for one image; not a vocabulary id
IGNORE_INDEX = -100       # label value that the loss ignores


class LlavaMinError(ValueError):
    """Every error llava-min raises about the user's input (a config, checkpoint, data file, flag): the message
    says what was wrong, where (file, key, sample id, rank) and what to do."""


_EXPORTS = {
    "InternLM2": "internlm2", "InternLM2Config": "internlm2",
    "DINOv2": "dinov2", "DINOv2Config": "dinov2",
    "CLIP": "clip", "CLIPConfig": "clip",
    "SigLIP": "siglip", "SigLIPConfig": "siglip",
    "Projector": "projector",
    "LLaVA": "llava",
    "Tokenizer": "tokenizer",
}

__all__ = [*_EXPORTS, "IMAGE_TOKEN_INDEX", "IGNORE_INDEX", "LlavaMinError"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'llava_min' has no attribute {name!r}")

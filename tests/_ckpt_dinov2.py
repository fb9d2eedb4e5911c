"""Tiny random DINOv2 and projector checkpoints in the official formats, for tests.

The DINOv2 folders are written by transformers itself (Dinov2Model / Dinov2WithRegistersModel.save_pretrained),
so they are hub-format checkpoints; the projector folders are written key by key with safetensors in XTuner's or
HF LLaVA's naming. Every weight is randomised (LayerNorm, LayerScale and biases included) so that a swapped or
ignored tensor shows up in the outputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def randomise_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add noise to every tensor of the state dict (the default init leaves norms at 1 and biases at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * scale)


def hf_dinov2(registers: int = 0, swiglu: bool = False, hidden: int = 32, layers: int = 2, heads: int = 4,
              image_size: int = 42, patch_size: int = 14, seed: int = 0):
    """A transformers Dinov2Model (registers == 0) or Dinov2WithRegistersModel with random weights, eager attention."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size,
              patch_size=patch_size, use_swiglu_ffn=swiglu, attn_implementation="eager")
    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    randomise_(model, seed)
    return model.eval()


def write_tiny_dinov2(folder, **kw):
    """Save hf_dinov2(**kw) to folder in the hub format; returns the transformers model (the reference)."""
    model = hf_dinov2(**kw)
    model.save_pretrained(folder)
    return model


def write_tiny_projector(folder, vision_hidden: int = 32, llm_hidden: int = 48, depth: int = 2, *,
                         names: str = "xtuner", config: bool = True, seed: int = 0) -> torch.nn.Sequential:
    """A projector checkpoint folder; returns the reference nn.Sequential(Linear, GELU, Linear, ...).

    names: "xtuner" (model.0 / model.2), "xtuner-prefixed" (projector.model.0), "hf" (linear_1 / linear_2) or
    "hf-prefixed" (multi_modal_projector.linear_1). config: write XTuner's config.json.
    """
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(vision_hidden, llm_hidden)]
    for _ in range(depth - 1):
        layers += [torch.nn.GELU(), torch.nn.Linear(llm_hidden, llm_hidden)]
    reference = torch.nn.Sequential(*layers)
    randomise_(reference, seed)
    rename = {"xtuner": "model.{i}", "xtuner-prefixed": "projector.model.{i}",
              "hf": "linear_{n}", "hf-prefixed": "multi_modal_projector.linear_{n}"}[names]
    if names.startswith("hf") and depth != 2:
        raise ValueError("HF LLaVA names exist for depth 2 only")
    tensors = {}
    for key, t in reference.state_dict().items():
        i, param = key.split(".")
        tensors[f"{rename.format(i=i, n=int(i) // 2 + 1)}.{param}"] = t.clone()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config:
        (folder / "config.json").write_text(json.dumps({
            "architectures": ["ProjectorModel"], "auto_map": {"AutoConfig": "configuration_projector.ProjectorConfig"},
            "model_type": "projector", "visual_hidden_size": vision_hidden, "llm_hidden_size": llm_hidden,
            "depth": depth, "hidden_act": "gelu", "bias": True, "torch_dtype": "float32"}))
    return reference

"""The vision-to-language projector: LLaVA-1.5's `mlp2x_gelu`, as XTuner's ProjectorModel builds
it.

Linear(vision_hidden -> llm_hidden), then (depth - 1) x [GELU (exact erf), Linear(llm_hidden ->
llm_hidden)]

depth 2 is LLaVA-1.5; others are XTuner's (`xtuner/model/modules/projector/`). Checkpoints:
XTuner's `projector/` folder (keys model.0 / model.2 / ...); loading also takes the prefix
"projector.", HF LLaVA's names, and no config.json.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from . import LlavaMinError, weights

# Checkpoint key -> module key, one table per naming scheme; a folder must use one scheme only.
KEY_MAPS = {
    "XTuner": [(r"^projector\.model\.", "model."), (r"^model\.", "model.")],
    "HF LLaVA": [(r"^(multi_modal_projector\.)?linear_1\.", "model.0."),
                 (r"^(multi_modal_projector\.)?linear_2\.", "model.2.")],
}


class Projector(nn.Module):
    """Maps ViT patch features (..., vision_hidden) to LLM embeddings (..., llm_hidden)."""

    def __init__(self, vision_hidden: int, llm_hidden: int, depth: int = 2, bias: bool = True):
        super().__init__()
        if depth < 1:
            raise LlavaMinError(f"projector depth must be >= 1, got {depth}")
        self.vision_hidden = vision_hidden
        self.llm_hidden = llm_hidden
        self.depth = depth
        self.bias = bias
        layers = [nn.Linear(vision_hidden, llm_hidden, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden, bias=bias)]
        self.model = nn.Sequential(*layers)   # index 1, 3, ... are the GELUs, as in XTuner's keys

    @property
    def dtype(self) -> torch.dtype:
        """The dtype its input is cast to (the first layer's weight's)."""
        return self.model[0].weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> "Projector":
        """An XTuner projector folder (or HF LLaVA's names), each tensor read once to `device` in
        `dtype`."""
        path = Path(path)
        files = weights.checkpoint_files(path)
        file = path / weights.CONFIG_FILE
        key_map = _key_map_of(files)
        sizes = _sizes_from_config(file) if file.exists() else _sizes_from_shapes(files, key_map)
        model = weights.build_on_meta(lambda: cls(*sizes))
        weights.load_into(model, path, key_map=key_map, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
        """XTuner's form (model.safetensors + its ProjectorConfig's config.json); cast to `dtype`
        on the way."""
        weights.save_state(self.state_dict(), path, dtype=dtype, max_shard_bytes=max_shard_bytes)
        config = {"architectures": ["ProjectorModel"], "model_type": "projector", "depth": self.depth,
                  "visual_hidden_size": self.vision_hidden, "llm_hidden_size": self.llm_hidden,
                  "hidden_act": "gelu", "bias": self.bias}
        weights.write_json(config, Path(path) / weights.CONFIG_FILE)


def _key_map_of(files: dict[str, Path]) -> list[tuple[str, str]]:
    """The key map of the one naming scheme the checkpoint uses; an error if it mixes two."""
    first_key = {}
    for key in files:
        for scheme, key_map in KEY_MAPS.items():
            if any(re.search(pattern, key) for pattern, _ in key_map):
                first_key.setdefault(scheme, key)
    if len(first_key) > 1:
        (a, ka), (b, kb) = first_key.items()
        raise LlavaMinError(f"{files[ka]}: the checkpoint mixes {a} names ({ka!r}) with {b} names ({kb!r}) "
                            f"in {files[kb].name}; keep one naming scheme per projector folder")
    return KEY_MAPS[next(iter(first_key), "XTuner")]


def _sizes_from_config(file: Path) -> tuple[int, int, int, bool]:
    config = weights.read_config(file)
    if config.get("model_type", "projector") != "projector":
        raise LlavaMinError(f"{file}: model_type {config.get('model_type')!r} is not an XTuner projector config "
                            "(model_type 'projector'); delete it to infer the sizes from the weights")
    # XTuner's ProjectorConfig defaults
    config = {"depth": 2, "bias": True, "hidden_act": "gelu"} | config
    for field in ("visual_hidden_size", "llm_hidden_size", "depth"):
        if type(config.get(field)) is not int or config[field] < 1:
            raise LlavaMinError(f"{file}: {field} must be a positive integer, got {config.get(field)!r}")
    if not isinstance(config["bias"], bool):
        raise LlavaMinError(f"{file}: bias must be true or false, got {config['bias']!r}")
    if config["hidden_act"] != "gelu":
        raise LlavaMinError(f"{file}: hidden_act {config['hidden_act']!r} is not supported "
                            "(only LLaVA's 'gelu')")
    return config["visual_hidden_size"], config["llm_hidden_size"], config["depth"], config["bias"]


def _sizes_from_shapes(files: dict[str, Path], key_map) -> tuple[int, int, int, bool]:
    """(vision_hidden, llm_hidden, depth, bias) read off the tensor shapes: Linear i sits at
    model.{2i}."""
    shapes = {}
    for key, file in files.items():
        with safe_open(str(file), framework="pt") as f:
            shape = tuple(f.get_slice(key).get_shape())
            shapes[weights.rename_key(key, key_map)] = (shape, key, file)
    if "model.0.weight" not in shapes:
        where = next(iter(files.values()), "the folder")
        raise LlavaMinError(f"{where}: no first projector layer (model.0.weight, projector.model.0.weight or "
                            f"linear_1.weight) among {sorted(files)[:6]}; is this a projector checkpoint?")
    shape, key, file = shapes["model.0.weight"]
    if len(shape) != 2:
        raise LlavaMinError(f"{file}: tensor {key!r} has shape {shape}; a Linear weight is 2-D")
    depth = 1
    while f"model.{2 * depth}.weight" in shapes:
        depth += 1
    return shape[1], shape[0], depth, "model.0.bias" in shapes

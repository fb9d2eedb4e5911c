"""The vision-to-language projector: LLaVA-1.5's `mlp2x_gelu`, as XTuner's ProjectorModel builds it.

    Linear(vision_hidden -> llm_hidden), then (depth - 1) x [GELU, Linear(llm_hidden -> llm_hidden)]

depth 2 is LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"); the depth
generalisation is XTuner's (`xtuner/model/modules/projector/modeling_projector.py`). GELU is the exact erf form.

Checkpoints. The folder format is XTuner's `projector/` folder: config.json
{"architectures": ["ProjectorModel"], "model_type": "projector", "visual_hidden_size", "llm_hidden_size", "depth",
"hidden_act", "bias"} and model.safetensors with keys model.0 / model.2 / ... (index 1, 3, ... are the GELUs).
Loading also accepts those keys under XTuner's whole-model prefix "projector.", and HF LLaVA's names
(linear_1 / linear_2, optionally under "multi_modal_projector."); without config.json the sizes come from the
tensor shapes. Saving always writes XTuner's form.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .weights import CONFIG_FILE, CheckpointError, build_on_meta, checkpoint_files, load_into, read_config, \
    rename_key, save_state, write_json

# Checkpoint key -> module key, one table per naming scheme. A folder must use one scheme only.
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
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        self.vision_hidden, self.llm_hidden, self.depth, self.bias = vision_hidden, llm_hidden, depth, bias
        layers = [nn.Linear(vision_hidden, llm_hidden, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden, bias=bias)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def config_dict(self) -> dict:
        """XTuner's ProjectorConfig as its config.json stores it."""
        return {"architectures": ["ProjectorModel"], "model_type": "projector",
                "visual_hidden_size": self.vision_hidden, "llm_hidden_size": self.llm_hidden,
                "depth": self.depth, "hidden_act": "gelu", "bias": self.bias}

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype | None = None, device="cpu") -> "Projector":
        """Load an XTuner projector folder (or one with HF LLaVA projector names); see the module docstring."""
        folder = Path(folder)
        files = checkpoint_files(folder)
        key_map = _key_map_of(files)
        if (folder / CONFIG_FILE).exists():
            sizes = _sizes_from_config(read_config(folder), folder / CONFIG_FILE)
        else:
            sizes = _sizes_from_shapes(files, key_map)
        model = build_on_meta(lambda: cls(*sizes))
        load_into(model, folder, key_map=key_map, dtype=dtype, device=device)
        return model

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_state(self.state_dict(), folder)
        write_json(self.config_dict(), folder / CONFIG_FILE)


def _key_map_of(files: dict[str, Path]) -> list[tuple[str, str]]:
    """The key map of the one naming scheme the checkpoint uses; an error if it mixes two."""
    first_key = {}
    for key in files:
        for scheme, key_map in KEY_MAPS.items():
            if any(re.search(pattern, key) for pattern, _ in key_map):
                first_key.setdefault(scheme, key)
    if len(first_key) > 1:
        (a, ka), (b, kb) = first_key.items()
        raise CheckpointError(f"{files[ka]}: the checkpoint mixes {a} names ({ka!r}) with {b} names ({kb!r}) "
                              f"in {files[kb].name}; keep one naming scheme per projector folder")
    return KEY_MAPS[next(iter(first_key), "XTuner")]


def _sizes_from_config(config: dict, file: Path) -> tuple[int, int, int, bool]:
    if config.get("model_type", "projector") != "projector":
        raise CheckpointError(f"{file}: model_type {config.get('model_type')!r} is not an XTuner projector config "
                              "(model_type 'projector'); delete it to infer the sizes from the weights")
    for field in ("visual_hidden_size", "llm_hidden_size"):
        if not isinstance(config.get(field), int) or isinstance(config.get(field), bool) or config[field] < 1:
            raise CheckpointError(f"{file}: {field} must be a positive integer, got {config.get(field)!r}")
    depth, bias, act = config.get("depth", 2), config.get("bias", True), config.get("hidden_act", "gelu")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise CheckpointError(f"{file}: depth must be an integer >= 1, got {depth!r}")
    if not isinstance(bias, bool):
        raise CheckpointError(f"{file}: bias must be true or false, got {bias!r}")
    if act != "gelu":
        raise CheckpointError(f"{file}: hidden_act {act!r} is not supported (only 'gelu', LLaVA's mlp2x_gelu)")
    return config["visual_hidden_size"], config["llm_hidden_size"], depth, bias


def _sizes_from_shapes(files: dict[str, Path], key_map) -> tuple[int, int, int, bool]:
    """(vision_hidden, llm_hidden, depth, bias) read off the tensor shapes: Linear i sits at model.{2i}."""
    shapes = {}
    for key, file in files.items():
        with safe_open(str(file), framework="pt") as f:
            shapes[rename_key(key, key_map)] = (tuple(f.get_slice(key).get_shape()), key, file)
    if "model.0.weight" not in shapes:
        some = next(iter(files), None)
        where = files[some] if some else "the folder"
        raise CheckpointError(f"{where}: no first projector layer (model.0.weight, projector.model.0.weight or "
                              f"linear_1.weight) among {sorted(files)[:6]}; is this a projector checkpoint?")
    shape, key, file = shapes["model.0.weight"]
    if len(shape) != 2:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}; a Linear weight is 2-D")
    depth = 1
    while f"model.{2 * depth}.weight" in shapes:
        depth += 1
    return shape[1], shape[0], depth, "model.0.bias" in shapes

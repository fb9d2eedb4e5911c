"""The backbones are used through their contracts: no file outside a backbone's own reaches into its modules.

A vision tower (dinov2.py, clip.py, siglip.py) is used through `config`, `blocks`, `features`, `hidden_states`,
`freeze_unused`, `set_gradient_checkpointing`, `from_pretrained` / `save_pretrained` and the static `load_config`
/ `presets`; the LLM (internlm2.py) through `config`, `embed`, `forward_hidden`, `output`, `new_cache`, `layers`,
`lora_targets`, `stop_ids`, `set_gradient_checkpointing`, `from_pretrained` / `save_pretrained`;
both through nn.Module's own methods. The check reads every file of the package and the two training scripts: any attribute taken of something named
`vit` / `llm` (a variable, or `model.vit`) must be one of those. It also proves it catches `model.vit.encoder`
and `llm.model.layers`, and that every tower class has every member of the contract.
"""
import ast
import dataclasses
import pathlib

import pytest
import torch
from torch import nn

from llava_min.internlm2 import InternLM2, InternLM2Config
from llava_min.llava import VISION_TOWERS

ROOT = pathlib.Path(__file__).resolve().parent.parent
OWN = {"vit": {"dinov2.py", "clip.py", "siglip.py"}, "llm": {"internlm2.py"}}
CONTRACT = {
    "vit": {"config", "blocks", "features", "hidden_states", "freeze_unused", "set_gradient_checkpointing",
            "from_pretrained", "save_pretrained", "load_config", "presets", "config_class"},
    "llm": {"config", "embed", "forward_hidden", "output", "new_cache", "layers", "set_gradient_checkpointing",
            "from_pretrained", "save_pretrained", "lora_targets", "stop_ids"},
}
# What a tower's config offers every user (memory.py's Plan holds the configs themselves as `plan.vit` / `plan.llm`).
CONFIG = {
    "vit": {"hidden_size", "patch_size", "num_hidden_layers", "num_attention_heads", "ffn_hidden_size", "image_size",
            "prefix_tokens", "preprocessing", "image_tokens", "blocks_run", "to_dict"},
    "llm": {f.name for f in dataclasses.fields(InternLM2Config)} | {"head_dim", "num_kv_groups", "to_dict"},
}
MODULE_METHODS = {name for name in dir(nn.Module) if not name.startswith("_")}


def reaches(source: str, part: str) -> list[str]:
    """`part.x` or `<anything>.part.x` expressions of `source` whose x is not in the contract, as 'line: text'."""
    found = []
    allowed = CONTRACT[part] | CONFIG[part] | MODULE_METHODS
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        named = (isinstance(base, ast.Name) and base.id == part) or (isinstance(base, ast.Attribute)
                                                                     and base.attr == part)
        if named and node.attr not in allowed:
            found.append((node.lineno, f"{node.lineno}: {ast.unparse(node)}"))
    return [text for _, text in sorted(found)]


def test_the_check_sees_a_reach_into_a_backbone():
    assert reaches("model.vit.encoder.layer[0]\nvit.layernorm\nmodel.vit.blocks[0]", "vit") == [
        "1: model.vit.encoder", "2: vit.layernorm"]
    assert reaches("for l in self.llm.model.layers: pass\nllm.layers\nllm.parameters()", "llm") == [
        "1: self.llm.model"]


@pytest.mark.parametrize("part", CONTRACT)
def test_nothing_outside_a_backbone_reaches_into_its_modules(part):
    files = sorted((ROOT / "llava_min").rglob("*.py")) + [ROOT / "train.py", ROOT / "finetune.py"]
    found = {str(f.relative_to(ROOT)): reaches(f.read_text(), part) for f in files if f.name not in OWN[part]}
    assert {f: lines for f, lines in found.items() if lines} == {}


def test_every_tower_has_the_whole_contract():
    for tower in set(VISION_TOWERS.values()):
        config = next(iter(tower.presets().values()))
        assert isinstance(config, tower.config_class)
        with torch.device("meta"):
            model = tower(config)
        assert [m for m in sorted(CONTRACT["vit"]) if not hasattr(model, m)] == [], tower
        assert [m for m in sorted(CONFIG["vit"]) if not hasattr(config, m)] == [], tower
    with torch.device("meta"):
        llm = InternLM2(InternLM2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    assert [m for m in sorted(CONTRACT["llm"]) if not hasattr(llm, m)] == []

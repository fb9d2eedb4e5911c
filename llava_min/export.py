"""A trained llava-min folder -> a transformers `LlavaForConditionalGeneration` folder.

    python -m llava_min.export --model OUT --out OUT-hf [--dtype source|bfloat16|float32]

OUT-hf loads with transformers alone, no remote code. InternLM2 after the grouped `wqkv` split is
a Llama (tests/test_internlm2.py proves it to 1e-4); the tower is transformers' own (DINOv2 here,
CLIP and SigLIP rows in TOWERS); the projector is Llava's two Linears. OUT-hf holds:
  config.json              LlavaConfig with a llama text config
  model*.safetensors       the weights under Llava's names (KEY_MAPS), `split_wqkv` once per layer,
                           written tensor by tensor: the model is never whole in memory
  tokenizer.json           InternLM2's fast tokenizer, which gives llava-min's ids (`tokenizer_json`)
  chat_template.jinja      the internlm2_chat prompt as `encode_conversation` builds it
  preprocessor_config.json the image settings that reproduce `llava_min.image`
  generation_config.json   <|im_end|> and </s> stop; README.md, a model card
Start at `export`. What transformers cannot express is refused, naming the way out (`tower_of`,
`check_image_settings`, `check_projector`, `image_token_id`, `check_tokenizer`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import LlavaMinError, weights
from .image import Preprocessing
from .internlm2 import IGNORE as INTERNLM2_IGNORE
from .internlm2 import InternLM2Config, load_config
from .llava import CONFIG_FILE, PARTS, LLaVAConfig, vision_config
from .tokenizer import INTERNLM2_PIECES, Tokenizer

IMAGE_TOKEN = "<image>"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# The dtypes of a safetensors header, by name
HEADER_DTYPES = {name: dtype for dtype, name in weights.SAFETENSORS_DTYPES.items()}

# Key maps: a part's checkpoint key -> its name in LlavaForConditionalGeneration (transformers
# >= 4.52 and 5.x). The first matching row wins; a key that no row matches is an error. "{qkv}":
# the fused wqkv, split into q_proj, k_proj and v_proj by `split_wqkv`.
LLM = "model.language_model."
LAYER = r"^model\.layers\.(\d+)\."
KEY_MAPS = {
    "llm": [
        (r"^model\.tok_embeddings\.weight$", LLM + "embed_tokens.weight"),
        (LAYER + r"attention_norm\.weight$", LLM + r"layers.\1.input_layernorm.weight"),
        (LAYER + r"attention\.wqkv\.(weight|bias)$", LLM + r"layers.\1.self_attn.{qkv}_proj.\2"),
        (LAYER + r"attention\.wo\.(weight|bias)$", LLM + r"layers.\1.self_attn.o_proj.\2"),
        (LAYER + r"ffn_norm\.weight$", LLM + r"layers.\1.post_attention_layernorm.weight"),
        (LAYER + r"feed_forward\.w1\.weight$", LLM + r"layers.\1.mlp.gate_proj.weight"),
        (LAYER + r"feed_forward\.w3\.weight$", LLM + r"layers.\1.mlp.up_proj.weight"),
        (LAYER + r"feed_forward\.w2\.weight$", LLM + r"layers.\1.mlp.down_proj.weight"),
        (r"^model\.norm\.weight$", LLM + "norm.weight"),
        (r"^output\.weight$", "lm_head.weight"),
    ],
    # XTuner's names (model.0 / model.2, perhaps under "projector."), or HF LLaVA's, as Projector
    # loads them
    "projector": [
        (r"^(projector\.)?model\.0\.(weight|bias)$", r"model.multi_modal_projector.linear_1.\2"),
        (r"^(projector\.)?model\.2\.(weight|bias)$", r"model.multi_modal_projector.linear_2.\2"),
        (r"^(multi_modal_projector\.)?linear_([12])\.(weight|bias)$",
         r"model.multi_modal_projector.linear_\2.\3"),
    ],
}


@dataclass
class Tower:
    """What differs between vision towers in a Llava folder. Llava feeds the projector hidden state
    `vision_feature_layer` of the tower, less its first token ("default") or whole ("full")."""
    model_type: str         # the vision_config's model_type: transformers' vision-only class
    select_strategy: str    # "default": drop the one class token; "full": keep every token
    prefix_tokens: int      # tokens before the patches (the processor's num_additional_image_tokens)
    interpolates: bool      # transformers interpolates the position embeddings to another size
    key_map: list           # checkpoint key -> the vision-only key (under model.vision_tower.)
    ignore: list            # keys of a full checkpoint that are not the vision tower


# Keys of the hub's full CLIP / SigLIP checkpoints that are not the vision tower
TEXT_TOWER = [r"^text_model\.", r"^logit_scale$", r"^logit_bias$", r"^text_projection\.",
              r"^visual_projection\."]

# By the model_type of vit/config.json, following transformers' CLIPVisionModel /
# SiglipVisionModel (SigLIP has no class token: LLaVA-OneVision's "full" strategy). The image
# statistics and crop come from the tower itself (its config's `preprocessing`).
TOWERS = {
    "dinov2": Tower("dinov2", "default", 1, True, [(r"^dinov2\.", "")], [r"^classifier\."]),
    "clip_vision_model": Tower("clip_vision_model", "default", 1, False,
                               [(r"^vision_model\.", "")], TEXT_TOWER),
    "siglip_vision_model": Tower("siglip_vision_model", "full", 0, False,
                                 [(r"^vision_model\.", "")], TEXT_TOWER),
}
# A full CLIP / SigLIP config.json (model_type clip / siglip) holds the tower's in "vision_config".
FULL_MODELS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
# config.json fields that describe a saved file, not the network
FILE_FIELDS = ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
               "auto_map")


# The one tensor transform

def split_wqkv(wqkv: torch.Tensor, n_heads: int, n_kv: int, head_dim: int):
    """InternLM2's fused wqkv weight (or bias) -> Llama's q_proj, k_proj, v_proj, as InternLM's
    tools/convert2llama.py splits it. The rows are laid out per key/value group: its
    G = n_heads / n_kv query heads, its key head, its value head, head_dim rows each; query head
    g * G + s is row block s of group g."""
    G = n_heads // n_kv
    rest = wqkv.shape[1:]                                   # (hidden,) for a weight, () for a bias
    grouped = wqkv.reshape(n_kv, G + 2, head_dim, *rest)    # (n_kv, G + 2, head_dim, ...)
    q = grouped[:, :G].reshape(n_heads * head_dim, *rest)   # (n_heads * head_dim, ...)
    k = grouped[:, G].reshape(n_kv * head_dim, *rest)       # (n_kv * head_dim, ...)
    v = grouped[:, G + 1].reshape(n_kv * head_dim, *rest)   # (n_kv * head_dim, ...)
    return q, k, v


# What transformers can express

def tower_of(vit_config: dict, file: Path) -> tuple[Tower, dict]:
    """The TOWERS row and the vision_config for vit/config.json; a tower that Llava cannot feed as
    llava-min does is refused."""
    config = {k: v for k, v in vit_config.items() if k not in FILE_FIELDS}
    model_type = config.get("model_type")
    if model_type in FULL_MODELS:
        config = dict(config["vision_config"], model_type=FULL_MODELS[model_type])
        model_type = config["model_type"]
    if model_type == "dinov2_with_registers":
        n = config.get("num_register_tokens", 4)
        raise LlavaMinError(
            f"{file}: a DINOv2 with {n} registers. Its hidden states are [CLS, {n} registers, "
            "patches] and llava-min feeds the projector the patches only, but transformers' Llava "
            "drops only the first token (vision_feature_select_strategy 'default') or none "
            f"('full'): it would feed the {n} registers too, a different model. Way out: train "
            "with a DINOv2 without registers (--vit-config dinov2-large, facebook/dinov2-large), "
            "or serve this model with llava-min (python -m llava_min.chat)")
    if model_type not in TOWERS:
        raise LlavaMinError(f"{file}: vision tower model_type {model_type!r} has no export row; "
                            f"known: {sorted(TOWERS)} and the full models {sorted(FULL_MODELS)}")
    return TOWERS[model_type], config


def check_image_settings(tower: Tower, vision: dict, llava: LLaVAConfig, model: Path) -> None:
    """The image mode must be one the processor reproduces, at a size the tower runs at."""
    file = model / CONFIG_FILE
    if llava.image_mode not in ("pad", "crop"):
        raise LlavaMinError(f"{file}: image_mode {llava.image_mode!r}; the export knows pad and crop")
    size = vision.get("image_size")
    if not tower.interpolates and size != llava.image_size:
        raise LlavaMinError(
            f"{file}: trained at image_size {llava.image_size}, but transformers' "
            f"{tower.model_type} runs at its config's image_size {size} only (Llava does not "
            "interpolate its position embeddings); fine-tune at that size, or serve with llava-min")


def check_projector(source: Source) -> None:
    """Llava's projector is Linear, GELU, Linear: another depth of XTuner's projector cannot load."""
    file = source.folder / weights.CONFIG_FILE
    if file.exists():
        depth = weights.read_config(file).get("depth", 2)
    else:
        linears = [re.search(r"(model\.|linear_)(\d+)\.weight$", key) for key in source.files]
        depth = len({m.group(2) for m in linears if m})
    if depth != 2:
        raise LlavaMinError(f"{source.folder}: a projector of depth {depth}; transformers' Llava has "
                            "exactly two Linear layers with one activation between them (LLaVA-1.5's "
                            "mlp2x_gelu)")


def check_widths(plan: dict, vision: dict, llm: InternLM2Config, model: Path) -> None:
    """The projector maps the tower's width to the LLM's, or Llava would re-initialise it."""
    shape = plan["model.multi_modal_projector.linear_1.weight"].shape
    widths = (llm.hidden_size, vision.get("hidden_size"))
    if tuple(shape) != widths:
        raise LlavaMinError(f"{model / 'projector'}: the projector maps {shape[1]} -> {shape[0]}, but "
                            f"the ViT width is {widths[1]} and the LLM width {widths[0]}")


def image_token_id(tok: Tokenizer, vocab_size: int) -> int:
    """An id for <image> that the LLM's embedding holds and no text uses: the first id past the
    tokenizer's pieces where the LLM's vocabulary is padded (the tiny preset); else InternLM2's first
    reserved piece that holds no chat token ([UNUSED_TOKEN_0], 92397). Llava overwrites that row
    with image features; the weights stay as they are."""
    if vocab_size > tok.vocab_size:
        return tok.vocab_size
    chat_pieces = set(INTERNLM2_PIECES.values())
    for i in range(tok.vocab_size):
        piece = tok.sp.id_to_piece(i)
        if re.fullmatch(r"\[UNUSED_TOKEN_\d+\]", piece) and piece not in chat_pieces:
            return i
    raise LlavaMinError(
        f"{tok.path}: no id is free for {IMAGE_TOKEN}: the LLM's vocabulary ({vocab_size}) is the "
        f"tokenizer's ({tok.vocab_size}) and holds no reserved [UNUSED_TOKEN_n] piece. Train with "
        "an LLM vocab_size larger than the tokenizer's (the tiny preset has 2048)")


def check_tokenizer(tok: Tokenizer) -> None:
    """tokenizer_json's normalizer only writes " " as "▁": the model must add no dummy prefix and keep
    text as it is (InternLM2's does, and `python -m llava_min.tokenizer train`'s). A dummy prefix,
    whitespace clean-up or NFKC would each give one of these pairs the same ids."""
    pairs = [("x", " x"), ("x  y", "x y"), ("\uff38", "X")]
    if any(tok.sp.encode(a) == tok.sp.encode(b) for a, b in pairs):
        raise LlavaMinError(f"{tok.path}: this sentencepiece model adds a dummy prefix or normalises "
                            "text, which the exported fast tokenizer would not do; use InternLM2's "
                            "tokenizer.model or one from `python -m llava_min.tokenizer train`")


# Weights: a plan of every output tensor from the headers alone, then one tensor at a time

class Source:
    """The tensors of one part folder (weights.checkpoint_files checks the index against the
    shards), read one at a time from the memory-mapped file. The file is opened for each read, so
    that no mapping outlives its tensor: the resident pages stay those of the tensor in hand."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = weights.checkpoint_files(folder)

    def header(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        with safe_open(str(self.files[key]), framework="pt") as f:
            piece = f.get_slice(key)
            return tuple(piece.get_shape()), HEADER_DTYPES[piece.get_dtype()]

    def read(self, key: str) -> torch.Tensor:
        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)


@dataclass
class Entry:
    """One output tensor: where it comes from and what it becomes."""
    source: Source
    key: str                  # in the source
    shape: tuple
    dtype: torch.dtype        # as written
    qkv: int | None = None    # 0, 1, 2: the q, k or v of a split wqkv


def plan_part(part: str, source: Source, key_map: list, ignore: list, dtype: torch.dtype | None,
              llm: InternLM2Config) -> dict[str, Entry]:
    """Output key -> Entry for every tensor of a part folder; an unknown key names key and file.
    dtype: of the floating tensors (None: as stored)."""
    prefix = ""
    if part == "vit":
        prefix = "model.vision_tower."
    plan = {}
    for key in source.files:
        if any(re.search(pattern, key) for pattern in ignore):
            continue
        new = weights.rename_key(key, key_map)
        if new == key and part != "vit":
            raise LlavaMinError(
                f"{source.files[key]}: tensor {key!r} has no Llava name ({part} key map: "
                f"{[pattern for pattern, _ in key_map]}). A LoRA adapter, or another naming scheme? "
                "Export a folder written by train.py / finetune.py: they merge LoRA into llm/")
        shape, stored = source.header(key)
        out_dtype = stored
        if dtype is not None and stored.is_floating_point:
            out_dtype = dtype
        if "{qkv}" not in new:
            plan[prefix + new] = Entry(source, key, shape, out_dtype)
            continue
        q_rows = llm.num_attention_heads * llm.head_dim
        kv_rows = llm.num_key_value_heads * llm.head_dim
        for i, (name, rows) in enumerate(zip("qkv", (q_rows, kv_rows, kv_rows))):
            plan[new.replace("{qkv}", name)] = Entry(source, key, (rows, *shape[1:]), out_dtype, i)
    return plan


class Maker:
    """make(key) for weights.save_streamed: each output tensor read from its source and cast. The
    three parts of a wqkv come from one read and one split (kept until another is asked for)."""

    def __init__(self, plan: dict[str, Entry], llm: InternLM2Config):
        self.plan = plan
        self.llm = llm
        self.split_key = None
        self.split = None

    def __call__(self, key: str) -> torch.Tensor:
        entry = self.plan[key]
        if entry.qkv is None:
            return entry.source.read(entry.key).to(entry.dtype)
        if self.split_key != entry.key:
            c = self.llm
            fused = entry.source.read(entry.key)
            self.split = split_wqkv(fused, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
            self.split_key = entry.key
        return self.split[entry.qkv].to(entry.dtype)


# Configs

def text_config(c: InternLM2Config, dtype: str) -> dict:
    """InternLM2's settings as a LlamaConfig; rope as transformers 5 (rope_parameters) and 4.x
    (rope_theta, rope_scaling) spell it."""
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    legacy_scaling = None
    if c.rope_scaling is not None:
        legacy_scaling = {"rope_type": c.rope_scaling["type"], "factor": float(c.rope_scaling["factor"])}
        rope = legacy_scaling | {"rope_theta": c.rope_theta}
    return {
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": rope, "rope_theta": c.rope_theta, "rope_scaling": legacy_scaling,
        "attention_bias": c.bias, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id, "initializer_range": c.initializer_range, "dtype": dtype,
    }


def llava_config(plan: dict[str, Entry], llm: InternLM2Config, vision: dict, tower: Tower,
                 llava: LLaVAConfig, image_id: int) -> dict:
    """config.json: LlavaConfig, its text and vision configs, the features llava-min feeds."""
    vision = dict(vision)
    vit_keys = [key for key in plan if key.startswith("model.vision_tower.")]
    vision["dtype"] = dtype_name(plan[vit_keys[0]].dtype)
    if tower.model_type == "siglip_vision_model":
        # The pooling head is LLaVA-OneVision's to drop: declare it only where its tensors came along.
        vision["vision_use_head"] = any(k.startswith("model.vision_tower.head.") for k in vit_keys)
    llm_dtype = dtype_name(plan["lm_head.weight"].dtype)
    patch = vision.get("patch_size", 14)
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": text_config(llm, llm_dtype), "vision_config": vision,
        "image_token_index": image_id, "image_seq_length": (llava.image_size // patch) ** 2,
        "projector_hidden_act": "gelu", "vision_feature_select_strategy": tower.select_strategy,
        "vision_feature_layer": llava.select_layer,
        "multimodal_projector_bias": "model.multi_modal_projector.linear_1.bias" in plan,
        "tie_word_embeddings": False, "dtype": llm_dtype,
    }


def image_processor_config(pre: Preprocessing, llava: LLaVAConfig) -> dict:
    """LlavaImageProcessor settings that give llava_min.image's pixels for the tower's
    preprocessing `pre`: "pad" is expand2square with the mean colour (do_pad computes it as
    image.py does), then a bicubic resize; "crop" resizes the shortest edge, then crops the centre
    (or, for a tower without a crop ratio, resizes to the square)."""
    size = llava.image_size
    settings = {
        "image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor",
        "do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pre.mean),
        "image_std": list(pre.std), "crop_size": {"height": size, "width": size},
    }
    if llava.image_mode == "pad":
        settings |= {"do_pad": True, "size": {"height": size, "width": size},
                     "do_center_crop": False}
    elif pre.crop_ratio is None:
        settings |= {"do_pad": False, "size": {"height": size, "width": size},
                     "do_center_crop": False}
    else:
        settings |= {"do_pad": False, "size": {"shortest_edge": round(size * pre.crop_ratio)},
                     "do_center_crop": True}
    return settings


# The chat template: XTuner's internlm2_chat (data.py's SYSTEM, INSTRUCTION, SUFFIX, SEP) written
# as ChatML, so that a rendered conversation is the text encode_conversation tokenizes. Content is
# a string or a list of {"type": "image"} / {"type": "text"} parts (an image part: "<image>\n"). A
# message with one <image> gets it moved to the front, as data.py's _tag_first does; several stay
# where they are. The template renders <s> and the tokenizer never adds it: one BOS either way.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = namespace(value='') %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set text.value = text.value + '<image>\\n' %}"
    "{% elif part['type'] == 'text' %}{% set text.value = text.value + part['text'] %}{% endif %}"
    "{% endfor %}{% set text = text.value %}{% endif %}"
    "{% if text.count('<image>') == 1 %}"
    "{% set text = ('<image>\\n' + text.replace('<image>', '') | trim) | trim %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + text + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# The tokenizer: InternLM2's fast tokenizer as JSON

def tokenizer_json(tok: Tokenizer, image_id: int) -> dict:
    """tokenizers' BPE over the sentencepiece vocabulary, as InternLM2's remote
    tokenization_internlm2_fast.py converts it (the fast tokenizer XTuner trains with, which
    llava-min's ids follow): pieces 0-2 named <unk> <s> </s>; the chat tokens and <image> named at
    their ids and added as special tokens; every split of a piece into two pieces a merge, ordered
    as transformers' SentencePieceExtractor orders them; byte fallback; " " written "▁"; no
    pre-tokenizer, no post-processor (no BOS added: the chat template renders it)."""
    sp = tok.sp
    names = {i: name for name, i in tok.special_ids.items()}
    names |= {sp.unk_id(): "<unk>", tok.bos_id: "<s>", tok.eos_id: "</s>", image_id: IMAGE_TOKEN}
    original = {sp.id_to_piece(i): i for i in range(tok.vocab_size)}
    vocab_scores = []
    for i in range(tok.vocab_size):
        score = sp.get_score(i)
        if i < 3:
            score = 0.0
        vocab_scores.append((names.get(i, sp.id_to_piece(i)), score))
    # A piece's merges in the order of their halves' ids, then all of them by the piece's score.
    merges = []
    for piece, score in vocab_scores:
        halves = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                  if piece[:k] in original and piece[k:] in original]
        merges += sorted(halves, key=lambda m: (original[m[0]], original[m[1]]))
    merges.sort(key=lambda m: m[2], reverse=True)
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, name in sorted(names.items())]
    bpe = {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
           "ignore_merges": False, "vocab": {piece: i for i, (piece, _) in enumerate(vocab_scores)},
           "merges": [[left, right] for left, right, _ in merges]}
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders}, "model": bpe,
    }


def tokenizer_config(max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "</s>", "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_length,
        "padding_side": "left", "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "chat_template": CHAT_TEMPLATE,
    }


# The folder

def export(model: str | Path, out: str | Path, dtype: str = "source",
           max_shard_bytes: int = 5 * 2**30) -> dict:
    """Write the transformers folder `out` for the llava-min folder `model`. dtype: source (each
    tensor as stored), bfloat16 or float32. Returns the bytes and tensors written, and the config."""
    model = Path(model)
    out = Path(out)
    if dtype != "source" and dtype not in DTYPES:
        raise LlavaMinError(f"--dtype {dtype!r}: use source, bfloat16 or float32")
    check_model_folder(model)
    llava = LLaVAConfig.read(model)
    llm = load_config(model / "llm")
    tower, vision = tower_of(weights.read_config(model / "vit" / weights.CONFIG_FILE), model / "vit")
    check_image_settings(tower, vision, llava, model)
    tok = Tokenizer(model / "tokenizer.model")
    check_tokenizer(tok)
    image_id = image_token_id(tok, llm.vocab_size)

    cast = DTYPES.get(dtype)
    sources = {part: Source(model / part) for part in PARTS}
    check_projector(sources["projector"])
    plan = plan_part("llm", sources["llm"], KEY_MAPS["llm"], INTERNLM2_IGNORE, cast, llm)
    plan |= plan_part("vit", sources["vit"], tower.key_map, tower.ignore, cast, llm)
    plan |= plan_part("projector", sources["projector"], KEY_MAPS["projector"], [], cast, llm)
    check_widths(plan, vision, llm, model)
    config = llava_config(plan, llm, vision, tower, llava, image_id)
    check_out_folder(out, model)

    # Everything goes into a folder beside OUT, renamed to OUT at the end: a killed export leaves
    # no half folder that would load as a model.
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shapes = {key: (entry.shape, entry.dtype) for key, entry in plan.items()}
    nbytes = weights.save_streamed(shapes, Maker(plan, llm), partial, max_shard_bytes=max_shard_bytes)
    weights.write_json(config, partial / weights.CONFIG_FILE)
    # The tower's own image statistics and crop, as llava-min's training fed it.
    pre = vision_config(model / "vit").preprocessing
    write_processor(partial, tok, image_id, tower, llava, config, llm, pre)
    write_generation_config(partial, tok, llava, llm)
    weights.write_atomic(partial / "README.md", model_card(model, out, config, llava))
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return {"bytes": nbytes, "tensors": len(plan), "config": config}


def check_model_folder(model: Path) -> None:
    if not (model / CONFIG_FILE).exists():
        raise LlavaMinError(f"{model}: no {CONFIG_FILE}; --model takes a folder written by train.py "
                            "or finetune.py (llm/, vit/, projector/, tokenizer.model, "
                            f"{CONFIG_FILE}), not a checkpoints/ step")
    # train.py may link a frozen part to its source folder (--save-frozen ref).
    for part in PARTS:
        link = model / part
        if link.is_symlink() and not link.exists():
            raise LlavaMinError(f"{link} is a symbolic link to {os.readlink(link)}, which no longer "
                                "exists; restore that folder")
    if not (model / "tokenizer.model").exists():
        raise LlavaMinError(f"{model / 'tokenizer.model'} is missing; train.py writes the tokenizer "
                            "beside the weights")


def check_out_folder(out: Path, model: Path) -> None:
    """OUT may be new, empty, or an earlier export (replaced); anything else is refused."""
    if out.resolve() == model.resolve() or model.resolve() in out.resolve().parents:
        raise LlavaMinError(f"--out {out} lies in --model {model}; write the export beside it")
    if not out.exists() or not any(out.iterdir()):
        return
    config = out / weights.CONFIG_FILE
    if not config.exists() or weights.read_config(config).get("model_type") != "llava":
        raise LlavaMinError(f"--out {out} exists and is not an earlier export (no Llava "
                            "config.json); give a new folder, or remove it first")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_processor(out: Path, tok: Tokenizer, image_id: int, tower: Tower, llava: LLaVAConfig,
                    config: dict, llm: InternLM2Config, pre: Preprocessing) -> None:
    """What AutoProcessor (LlavaProcessor) reads: tokenizer.json, tokenizer_config.json,
    chat_template.jinja, preprocessor_config.json, processor_config.json."""
    tokenizer = json.dumps(tokenizer_json(tok, image_id), ensure_ascii=False)
    weights.write_atomic(out / "tokenizer.json", tokenizer)
    weights.write_json(tokenizer_config(llm.max_position_embeddings), out / "tokenizer_config.json")
    weights.write_atomic(out / "chat_template.jinja", CHAT_TEMPLATE)
    weights.write_json(image_processor_config(pre, llava), out / "preprocessor_config.json")
    processor = {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN,
                 "patch_size": config["vision_config"].get("patch_size", 14),
                 "vision_feature_select_strategy": tower.select_strategy,
                 "num_additional_image_tokens": tower.prefix_tokens}
    weights.write_json(processor, out / "processor_config.json")


def write_generation_config(out: Path, tok: Tokenizer, llava: LLaVAConfig,
                            llm: InternLM2Config) -> None:
    """Stops at llava-min's stop_ids (<|im_end|>, </s>). The ids past the tokenizer's pieces (the
    LLM's padding, <image> among them) are never generated, as llava-min's generate masks them."""
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": list(llava.stop_ids),
                  "pad_token_id": tok.eos_id, "do_sample": False}
    text_vocab = llava.text_vocab_size or tok.vocab_size
    if text_vocab < llm.vocab_size:
        generation["suppress_tokens"] = list(range(text_vocab, llm.vocab_size))
    weights.write_json(generation, out / "generation_config.json")


USAGE = '''```python
from PIL import Image, ImageOps
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("{name}")
processor = AutoProcessor.from_pretrained("{name}", backend="pil")
image = ImageOps.exif_transpose(Image.open("cat.jpg"))
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is it?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt")
new = model.generate(**inputs, max_new_tokens=64)[0, inputs.input_ids.shape[1]:]
print(processor.decode(new, skip_special_tokens=True))
```'''


def model_card(model: Path, out: Path, config: dict, llava: LLaVAConfig) -> str:
    """README.md of the folder: what the model is, how it was trained (args.json), how to load it."""
    args = {}
    if (model / "args.json").exists():
        args = json.loads((model / "args.json").read_text())
    text = config["text_config"]
    vision = config["vision_config"]
    flags = [f"| `--{k.replace('_', '-')}` | `{v}` |" for k, v in args.items()
             if v not in (None, False, [])]
    if not flags:
        flags = ["| (no args.json in the model folder) | |"]
    about = (
        f"A LLaVA model trained with llava-min: a {vision['model_type']} vision tower "
        f"({vision.get('num_hidden_layers')} layers, width {vision.get('hidden_size')}), LLaVA-1.5's "
        f"two-layer GELU projector and an InternLM2 language model ({text['num_hidden_layers']} "
        f"layers, width {text['hidden_size']}, vocabulary {text['vocab_size']}) stored as a Llama "
        "(InternLM2's fused wqkv split into q/k/v), trained on images of "
        f"{llava.image_size} x {llava.image_size} pixels ({llava.image_mode} mode) with the features of "
        f"the tower's hidden state {llava.select_layer}. It loads with transformers alone, no remote "
        "code.")
    notes = (
        "Prompts: XTuner's internlm2_chat, `<s><|im_start|>user\\n<image>\\n...<|im_end|>\\n"
        "<|im_start|>assistant\\n` (chat_template.jinja; the template renders `<s>`, the tokenizer "
        f"adds none). Each image takes {config['image_seq_length']} positions. `backend=\"pil\"` gives "
        "the pixels the model was trained on; the torchvision backend resizes with its own bicubic "
        "kernel. Typed into a message, a chat-token name such as `<|im_end|>` is that token here "
        "(llava-min reads it as text).")
    lines = [f"# {model.name}, exported from llava-min", "", about, "", USAGE.format(name=out.name),
             "", notes, "", "## Training (args.json)", "", "| flag | value |", "|---|---|", *flags]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m llava_min.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folder written by train.py / finetune.py")
    p.add_argument("--out", required=True, help="the transformers folder (an earlier one is replaced)")
    p.add_argument("--dtype", default="source", choices=["source", *DTYPES],
                   help="of the weights; source: each tensor as stored in --model")
    args = p.parse_args(argv)
    try:
        written = export(args.model, args.out, args.dtype)
    except LlavaMinError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: {written['tensors']} tensors, {written['bytes'] / 1e6:.1f} MB; load it "
          "with LlavaForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained")


if __name__ == "__main__":
    main()

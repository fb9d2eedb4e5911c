"""A tiny random LLaVA written as three official-format folders (InternLM2 with fused wqkv, a vision tower in its
hub format, XTuner projector), and the same weights as a transformers LlavaForConditionalGeneration (the reference).

    hf = write_tiny_llava(folder, llm_config, vit=dict(hidden=32, layers=3), image_token_id=V - 1)
    hf = write_tiny_llava(folder, llm_config, tower="siglip")     # or "clip"; the default is "dinov2"
    model = LLaVA.from_pretrained(llm=folder / "llm", vit=folder / "vit", projector=folder / "projector")

transformers' LLaVA marks each image position with a vocabulary id (`image_token_id`) repeated once per patch,
where llava-min uses one IMAGE_TOKEN_INDEX (-200) per image: `expand_image_tokens` turns one into the other.
The DINOv2 is the plain (no-register) variant: transformers' "default" feature strategy drops only CLS (DINOv2,
CLIP); SigLIP has no CLS and feeds every token ("full"), as LLaVA-OneVision does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from _ckpt_clip import write_tiny_clip
from _ckpt_dinov2 import write_tiny_dinov2, write_tiny_projector
from _ckpt_internlm2 import internlm2_to_llama, random_internlm2_state, write_internlm2_checkpoint
from _ckpt_siglip import write_tiny_siglip
from llava_min import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_min.internlm2 import InternLM2Config

# The tower's checkpoint writer (returns the transformers reference) and transformers' feature strategy.
TOWERS = {"dinov2": (write_tiny_dinov2, "default"), "clip": (write_tiny_clip, "default"),
          "siglip": (write_tiny_siglip, "full")}


def write_tiny_llava(folder, llm_config: InternLM2Config, vit: dict | None = None, image_token_id: int | None = None,
                     seed: int = 0, num_shards: int = 2, attn_implementation: str = "eager", llm_std: float = 0.08,
                     tower: str = "dinov2"):
    """Write folder/llm, folder/vit, folder/projector; return the transformers reference holding the same weights.

    vit: keyword arguments of the tower's writer (hidden, layers, heads, image_size, patch_size).
    image_token_id: the vocabulary id transformers replaces with image features (default: the last id).
    llm_std: spread of the random LLM weights (wider models want smaller ones).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    folder = Path(folder)
    vit = dict(vit or {})
    state = random_internlm2_state(llm_config, seed, std=llm_std)
    write_internlm2_checkpoint(folder / "llm", llm_config, state, num_shards=num_shards)
    write_vit, strategy = TOWERS[tower]
    vision = write_vit(folder / "vit", seed=seed, **vit)
    projector = write_tiny_projector(folder / "projector", vision_hidden=vision.config.hidden_size,
                                     llm_hidden=llm_config.hidden_size, seed=seed + 1)
    llama = internlm2_to_llama(llm_config, state)

    image_token_id = llm_config.vocab_size - 1 if image_token_id is None else image_token_id
    config = LlavaConfig(text_config=llama.config, vision_config=vision.config, image_token_index=image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy=strategy,
                         projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    hf = LlavaForConditionalGeneration(config)
    tensors = {"lm_head.weight": llama.lm_head.weight}
    tensors.update({"model.language_model." + k.removeprefix("model."): v
                    for k, v in llama.state_dict().items() if k.startswith("model.")})
    tensors.update({"model.vision_tower." + k: v for k, v in vision.state_dict().items()})
    tensors.update({f"model.multi_modal_projector.linear_{int(i) // 2 + 1}.{p}": v
                    for (i, p), v in ((k.split("."), v) for k, v in projector.state_dict().items())})
    hf.load_state_dict(tensors, strict=True)
    return hf.eval()


def expand_image_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_patches: int, image_token_id: int,
                        labels: torch.Tensor | None = None, pad_id: int = 0, padding_side: str = "right"):
    """llava-min inputs (one -200 per image) -> transformers inputs (n_patches copies of image_token_id).

    Each row keeps only its real positions (attention_mask 1), expanded, then is padded on `padding_side`
    to the longest row. Returns input_ids, attention_mask and labels (or None), each (B, T').
    """
    rows = []
    for b in range(input_ids.shape[0]):
        ids, lab = [], []
        for t in range(input_ids.shape[1]):
            if not attention_mask[b, t]:
                continue
            tok = int(input_ids[b, t])
            n = n_patches if tok == IMAGE_TOKEN_INDEX else 1
            ids += [image_token_id if tok == IMAGE_TOKEN_INDEX else tok] * n
            if labels is not None:
                lab += [IGNORE_INDEX if tok == IMAGE_TOKEN_INDEX else int(labels[b, t])] * n
        rows.append((ids, lab))
    width = max(len(ids) for ids, _ in rows)
    out_ids, out_mask, out_labels = [], [], []
    for ids, lab in rows:
        pad = width - len(ids)

        def place(real, fill):
            return real + [fill] * pad if padding_side == "right" else [fill] * pad + real

        out_ids.append(place(ids, pad_id))
        out_mask.append(place([1] * len(ids), 0))
        out_labels.append(place(lab, IGNORE_INDEX))
    return (torch.tensor(out_ids), torch.tensor(out_mask),
            torch.tensor(out_labels) if labels is not None else None)

"""LLaVA: vision-tower features -> MLP projector -> spliced into InternLM2's input embeddings.
Start at `LLaVA.forward`.

LLaVA-1.5 / XTuner's composition (`xtuner/model/llava.py`), equal to transformers'
`LlavaForConditionalGeneration` to 1e-4 (tests/test_llava.py; tests/test_clip.py and test_siglip.py
on those towers).

The vision tower is any class of `VISION_TOWERS` (dinov2.py, clip.py, siglip.py), used through the
members they share: `config` (hidden_size, patch_size, prefix_tokens, image_tokens(size),
blocks_run(layer), preprocessing), `blocks`, `features(pixels, layer)`, `freeze_unused(layer)`,
`set_gradient_checkpointing`, `from_pretrained` / `save_pretrained`, and the static `load_config` /
`presets`. The LLM likewise through InternLM2's `embed`, `forward_hidden`, `output`, `new_cache`,
`layers`. Nothing here reaches into their modules (tests/test_imports.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaMinError, weights
from .clip import CLIP
from .dinov2 import DINOv2
from .image import normalize
from .internlm2 import InternLM2
from .projector import Projector
from .siglip import SigLIP
from .weights import write_json

CONFIG_FILE = "llava_config.json"
PARTS = ("projector", "llm", "vit")   # what --train can name, and the sub-folders of a saved model

# config.json's model_type -> the vision tower class that reads the folder. A fork adds its tower's
# file and a row.
VISION_TOWERS = {"dinov2": DINOv2, "dinov2_with_registers": DINOv2, "clip": CLIP, "clip_vision_model": CLIP,
                 "siglip": SigLIP, "siglip_vision_model": SigLIP}


def vision_tower(name_or_path: str | os.PathLike) -> type[nn.Module]:
    """The tower class of a preset name (of any tower) or of a folder / config.json, by its
    model_type."""
    towers = list(dict.fromkeys(VISION_TOWERS.values()))
    for tower in towers:
        if str(name_or_path) in tower.presets():
            return tower
    path = Path(name_or_path)
    if not path.exists():
        names = [name for tower in towers for name in tower.presets()]
        raise LlavaMinError(f"{path}: neither a vision tower preset ({', '.join(names)}) nor an existing "
                            "config.json file or model folder")
    file = path / weights.CONFIG_FILE if path.is_dir() else path
    # A config.json without a model_type is read as DINOv2's, this project's first tower.
    model_type = weights.read_config(file).get("model_type", "dinov2")
    if model_type not in VISION_TOWERS:
        raise LlavaMinError(f"{file}: model_type {model_type!r} is no vision tower known here "
                            f"({', '.join(VISION_TOWERS)}); add its tower to llava.VISION_TOWERS")
    return VISION_TOWERS[model_type]


def vision_config(name_or_path: str | os.PathLike):
    """The config of a tower preset, folder or config.json, read by the tower it names."""
    return vision_tower(name_or_path).load_config(name_or_path)


def tower_of(config) -> type[nn.Module]:
    """The tower class that builds a tower config (a DINOv2Config -> DINOv2, ...)."""
    return next(tower for tower in VISION_TOWERS.values() if isinstance(config, tower.config_class))


def parse_parts(spec: str) -> set[str]:
    """--train's value ("projector,llm", "all") -> {"projector", "llm"}."""
    parts = set(PARTS) if spec == "all" else {p.strip() for p in spec.split(",") if p.strip()}
    if not parts or not parts <= set(PARTS):
        raise LlavaMinError(f"--train {spec!r}: use a comma list of {', '.join(PARTS)}, or all")
    return parts


@dataclass
class LLaVAConfig:
    # ViT hidden state fed to the projector (LLaVA / XTuner default)
    select_layer: int = -2
    image_size: int = 224           # square input size the model was trained with
    # "pad" (LLaVA-1.5 expand-to-square) or "crop" (the tower's own processor)
    image_mode: str = "pad"
    stop_ids: list[int] = field(default_factory=lambda: list(InternLM2.stop_ids))  # <|im_end|>, </s>
    pad_id: int = 0                 # input_ids padding (XTuner's DEFAULT_PAD_TOKEN_INDEX)
    # The tokenizer's size; generation never picks the LLM's padding ids
    text_vocab_size: int | None = None

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "LLaVAConfig":
        """FOLDER/llava_config.json; fields this version does not know are left out."""
        saved = json.loads((Path(folder) / CONFIG_FILE).read_text())
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})


@dataclass
class LLaVAOutput:
    """What `LLaVA.forward` returns; `logits` is computed on first access."""
    # (B, T', D) final-normed LLM states, T' = T + (N - 1) per image
    hidden: torch.Tensor
    head: nn.Module                       # the LLM's output projection
    labels: torch.Tensor | None           # (B, T') spliced labels, -100 where unsupervised
    # (B, T') > 0 on real positions (k on a packed row's k-th sample)
    attention_mask: torch.Tensor
    # Mean next-token loss over supervised positions (None without labels)
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None  # summed loss, for normalising by a global token count
    num_tokens: int = 0                   # supervised positions in this batch

    @cached_property
    def logits(self) -> torch.Tensor:
        return self.head(self.hidden).float()  # (B, T', vocab)


class LLaVA(nn.Module):
    """Vision tower -> Projector -> InternLM2. Reference: transformers
    `models/llava/modeling_llava.py`."""

    def __init__(self, llm: InternLM2, vit: nn.Module, projector: Projector, config: LLaVAConfig | None = None):
        super().__init__()
        self.llm = llm
        self.vit = vit
        self.projector = projector
        self.config = config or LLaVAConfig()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                loss_chunk: int = 1024) -> LLaVAOutput:
        """input_ids (B, T) with one IMAGE_TOKEN_INDEX per image; pixel_values (n_images, 3, H, W)
        in row-major order of the placeholders; labels (B, T), -100 where unsupervised;
        attention_mask (B, T), 1 = real, 0 = padding, or for packed rows (`collate_packed`) k on a
        row's k-th sample (sees itself only, from position 0)."""
        embeds, labels, mask = self.embed(input_ids, pixel_values, labels, attention_mask)
        # Right padding (what `collate` makes) needs no mask: causal attention already keeps the
        # trailing pads away from every real position, and the kernel's causal fast path is quicker
        # than an explicit mask. Packed rows fail this test (the sample numbers rise along a row)
        # and go to the LLM's packed path.
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
        # (B, T', D)
        hidden = self.llm.forward_hidden(embeds, attention_mask=None if right_padded else mask)
        out = LLaVAOutput(hidden=hidden, head=self.llm.output, labels=labels, attention_mask=mask)
        if labels is not None:
            # Only the supervised positions go through the output head.
            supervised = trained_positions(labels, mask)                       # (B, T')
            # (n,) row-major, as hidden[supervised]
            targets = labels[:, 1:][supervised[:, :-1]]
            out.loss_sum, out.num_tokens = self._loss_sum(hidden[supervised], targets, loss_chunk)
            out.loss = out.loss_sum / max(out.num_tokens, 1)
        return out

    def _loss_sum(self, h: torch.Tensor, targets: torch.Tensor, chunk: int):
        """Summed cross-entropy of the supervised states h (n, D) against targets (n,), and n. The
        head runs `chunk` rows at a time, recomputed in backward: the (B, T, vocab) logits and
        their fp32 softmax never exist whole."""
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            total = total + checkpoint(self._chunk_loss, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
        # No supervised token: a zero loss through the head, which still reaches every weight
        if h.shape[0] == 0:
            total = total + 0.0 * self.llm.output(h).sum()
        return total, int(targets.numel())

    def _chunk_loss(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.llm.output(h).float(), t, reduction="sum")

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
        """Splice the image features into the token embeddings: (B, T', D) embeddings, labels (B,
        T') or None (-100 on image positions), attention_mask (B, T'). Each row keeps its padding
        where it was."""
        B, T = input_ids.shape
        is_image = input_ids == IMAGE_TOKEN_INDEX                              # (B, T)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if int(is_image.sum()) != n_images:
            raise LlavaMinError(f"input_ids hold {int(is_image.sum())} image placeholders ({IMAGE_TOKEN_INDEX}) "
                                f"(per batch row: {is_image.sum(1).tolist()}) but pixel_values has {n_images} "
                                "images; each image needs exactly one placeholder, in order")
        # (n, N, D)
        if n_images:
            feats = self.image_features(pixel_values)
        else:
            feats = self._no_image_features()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        # Expand each placeholder to its N positions: output column j of a row comes from the input
        # position t whose span [end[t - 1], end[t]) holds j; columns past the row's end (rows with
        # fewer images) are padding. A row's trailing padding takes no columns, so T' is the
        # longest row's real length, whatever the images.
        # (B, T) after the last real one
        trailing = (attention_mask > 0).flip(1).cumsum(1).flip(1) == 0
        end = torch.where(is_image, feats.shape[1], (~trailing).long()).cumsum(1)   # (B, T)
        # (B, T')
        cols = torch.arange(int(end[:, -1].max()), device=input_ids.device).repeat(B, 1)
        # (B, T'), T past the end
        src = torch.searchsorted(end, cols, right=True)
        past_end = src == T
        src = src.clamp(max=T - 1)
        ids = input_ids.gather(1, src).masked_fill(past_end, self.config.pad_id)
        mask = attention_mask.gather(1, src).masked_fill(past_end, 0)
        image = ids == IMAGE_TOKEN_INDEX                                          # (B, T')
        if labels is not None:
            labels = labels.gather(1, src).masked_fill(past_end | image, IGNORE_INDEX)

        x = self.llm.embed(ids.masked_fill(image, self.config.pad_id))           # (B, T', D)
        # The image positions, in row-major order, are each image's N patches in turn, images in
        # order. A text-only batch assigns no rows here, yet keeps a trainable projector (and ViT)
        # in the graph: no DDP hang.
        # (n_images * N, D)
        x[image] = feats.flatten(0, 1).to(x.dtype)
        return x, labels, mask

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, H, W) normalised floats, or the uint8 pixels of the training data
        (normalised here, on the device) -> (n_images, N, D_llm) projected patch features."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize(pixel_values, self.vit.config.preprocessing)
        # A frozen ViT runs without autograd, so it keeps no activations for backward.
        vit_trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.vit.parameters())
        with torch.set_grad_enabled(vit_trains):
            # Stops at select_layer
            feats = self.vit.features(pixel_values, layer=self.config.select_layer)
        return self.projector(feats.to(self.projector.dtype))

    def _no_image_features(self) -> torch.Tensor:
        """Features for a batch without images: none, (0, 1, D); but while the projector (or ViT)
        trains, those of one tiny dummy image with its patches sliced away, (1, 0, D), so that
        every rank uses the same parameters every step (XTuner's zero-image trick; nanoVLM skips
        such batches instead)."""
        w = next(self.projector.parameters())
        trained = [p.requires_grad for m in (self.projector, self.vit) for p in m.parameters()]
        if torch.is_grad_enabled() and any(trained):
            p = self.vit.config.patch_size
            return self.image_features(w.new_zeros(1, 3, p, p))[:, :0]
        return w.new_zeros(0, 1, self.projector.llm_hidden)

    # Generation

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 attention_mask: torch.Tensor | None = None, stop_ids: list[int] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each row; returns (B, n) new ids only. A row ends at a stop id (kept) and is
        padded with the first stop id afterwards. temperature 0 = greedy; otherwise sampling with
        top-p."""
        device = input_ids.device
        if stop_ids is None:
            stop_ids = self.config.stop_ids
        stop = torch.tensor(stop_ids, device=device)
        embeds, _, mask = self.embed(input_ids, pixel_values, None, attention_mask)
        # New tokens are appended on the right
        embeds, mask = _left_align(embeds, mask)
        B, T, _ = embeds.shape
        cache = self.llm.new_cache(B, T + max_new_tokens, dtype=embeds.dtype, device=device)
        if bool(mask.all()):
            # No padding: the kernel's causal fast path, positions 0, 1, ...
            full_mask = positions = None
        else:
            # (B, T + max_new)
            full_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)
            # Each row's first real token: 0
            positions = (torch.cumsum(full_mask, 1) - 1).clamp(min=0)
        hidden = self.llm.forward_hidden(embeds, attention_mask=_cols(full_mask, 0, T),
                                         position_ids=_cols(positions, 0, T), cache=cache)[:, -1]   # (B, D)
        out = torch.full((B, max_new_tokens), int(stop[0]), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n = 0
        for step in range(max_new_tokens):
            logits = self.llm.output(hidden).float()                         # (B, vocab)
            # Padded vocabulary: ids with no text
            if self.config.text_vocab_size is not None:
                logits[:, self.config.text_vocab_size:] = float("-inf")
            token = torch.where(done, stop[0], _pick(logits, temperature, top_p, generator))
            out[:, step] = token
            n = step + 1
            done |= torch.isin(token, stop)
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            # The new token's column
            p = T + step
            hidden = self.llm.forward_hidden(self.llm.embed(token[:, None]), attention_mask=_cols(full_mask, 0, p + 1),
                                             position_ids=_cols(positions, p, p + 1), cache=cache)[:, -1]
        return out[:, :n]

    # Loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, llm=None, vit=None, projector=None,
                        dtype: torch.dtype | None = None, device="cpu") -> "LLaVA":
        """`LLaVA.from_pretrained(out_dir)` for a folder written by train.py / finetune.py, or
        `LLaVA.from_pretrained(llm=dir, vit=dir, projector=dir)`; without a projector it is freshly
        initialised."""
        config = LLaVAConfig()
        if path is not None:
            path = Path(path)
            if not (path / CONFIG_FILE).exists():
                raise LlavaMinError(f"{path}: no {CONFIG_FILE}; a LLaVA folder written by train.py holds "
                                    f"{CONFIG_FILE}, llm/, vit/ and projector/. For separate parts use "
                                    "LLaVA.from_pretrained(llm=..., vit=..., projector=...)")
            # train.py may link a frozen part to its source folder instead of copying it
            for part in PARTS:
                link = path / part
                if link.is_symlink() and not link.exists():
                    raise LlavaMinError(f"{link} is a symbolic link to {os.readlink(link)}, which no longer exists; "
                                        "restore the source folder, or re-save the model with --save-frozen copy")
            config = LLaVAConfig.read(path)
            llm = path / "llm"
            vit = path / "vit"
            projector = path / "projector"
        if llm is None or vit is None:
            raise LlavaMinError("LLaVA.from_pretrained needs a LLaVA folder, or both llm= and vit= folders")
        llm_model = InternLM2.from_pretrained(llm, dtype=dtype, device=device)
        vit_model = vision_tower(vit).from_pretrained(vit, dtype=dtype, device=device)
        widths = (vit_model.config.hidden_size, llm_model.config.hidden_size)
        # Drawn on the CPU, as train.py does: the same fresh projector on any device
        if projector is None:
            proj = Projector(*widths).to(device, dtype)
        else:
            proj = Projector.from_pretrained(projector, dtype=dtype, device=device)
        if (proj.vision_hidden, proj.llm_hidden) != widths:
            raise LlavaMinError(f"{projector}: projector maps {proj.vision_hidden} -> {proj.llm_hidden}, but the "
                                f"ViT width is {widths[0]} and the LLM width {widths[1]}")
        return cls(llm_model, vit_model, proj, config)

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
        """llm/ (InternLM2, LoRA merged), vit/ (the tower's hub format), projector/ (XTuner),
        llava_config.json."""
        path = Path(path)
        for part in PARTS:
            getattr(self, part).save_pretrained(path / part, dtype=dtype, max_shard_bytes=max_shard_bytes)
        write_json(asdict(self.config), path / CONFIG_FILE)

    def set_gradient_checkpointing(self, flag: bool = True) -> None:
        self.llm.set_gradient_checkpointing(flag)
        self.vit.set_gradient_checkpointing(flag)


def trained_positions(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions t whose next token is a target: supervised, and in the same
    sample (a packed sample's last position has the next sample's first token after it). train.py
    counts these to normalise."""
    keep = (labels[:, 1:] != IGNORE_INDEX) & (mask[:, 1:] == mask[:, :-1])          # (B, T - 1)
    # The last predicts nothing
    return F.pad(keep, (0, 1))


def _cols(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if t is None else t[:, start:stop]


def _left_align(embeds: torch.Tensor, mask: torch.Tensor):
    """Move each row's real positions to the right end (left padding), keeping their order."""
    B, T, D = embeds.shape
    # Padding (0) first, each part in order
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
    return torch.gather(embeds, 1, order[..., None].expand(B, T, D)), torch.gather(mask, 1, order)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        # Keep the smallest set reaching top_p
        drop = torch.cumsum(sorted_p, -1) - sorted_p > top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

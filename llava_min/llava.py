"""LLaVA: DINOv2 features -> MLP projector -> spliced into InternLM2's input embeddings.

The composition follows LLaVA-1.5 / XTuner (`xtuner/model/llava.py`, `prepare_inputs_labels_for_multimodal`
in `xtuner/model/utils.py`) and matches transformers' `LlavaForConditionalGeneration` numerically:

  1. the ViT runs on every image; hidden state `select_layer` (default -2, the penultimate block's output,
     not normed) is taken and the prefix tokens (CLS, registers) are dropped: (n_images, N, D_vit);
  2. the projector maps them to the LLM width: (n_images, N, D_llm);
  3. each IMAGE_TOKEN_INDEX (-200) in `input_ids` is replaced by the N vectors of its image, in order,
     and the labels there become IGNORE_INDEX (-100);
  4. the LLM runs on the spliced embeddings; the loss is next-token cross-entropy averaged over the
     supervised positions only. Logits are computed lazily: training never builds the (B, T, vocab) tensor.

A frozen ViT runs under `torch.no_grad`, so it holds no activations for backward.
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

from . import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .dinov2 import DINOv2
from .image import normalize
from .internlm2 import InternLM2
from .projector import Projector
from .weights import write_json

CONFIG_FILE = "llava_config.json"
PARTS = ("projector", "llm", "vit")   # what --train can name


def parse_parts(spec: str) -> set[str]:
    """--train's value ("projector,llm", "all") -> {"projector", "llm"}."""
    parts = set(PARTS) if spec == "all" else {p.strip() for p in spec.split(",") if p.strip()}
    if not parts or not parts <= set(PARTS):
        raise ValueError(f"--train {spec!r}: use a comma list of {', '.join(PARTS)}, or all")
    return parts


@dataclass
class LLaVAConfig:
    select_layer: int = -2          # ViT hidden state fed to the projector (LLaVA / XTuner default)
    image_size: int = 224           # square input size the model was trained with
    image_mode: str = "pad"         # "pad" (LLaVA-1.5 expand-to-square) or "crop" (DINOv2 centre crop)
    stop_ids: list[int] = field(default_factory=lambda: [92542, 2])  # <|im_end|>, </s>
    pad_id: int = 0                 # input_ids padding (XTuner's DEFAULT_PAD_TOKEN_INDEX)
    text_vocab_size: int | None = None  # the tokenizer's size; generation never picks the LLM's padding ids

    @classmethod
    def from_dict(cls, d: dict) -> "LLaVAConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class LLaVAOutput:
    """What `LLaVA.forward` returns. `logits` is computed on first access, from the final hidden states."""
    hidden: torch.Tensor | None           # (B, T', D) final-normed LLM hidden states; None with loss_only
    head: nn.Module                       # the LLM's output projection
    labels: torch.Tensor | None           # (B, T') spliced labels, -100 where unsupervised
    attention_mask: torch.Tensor          # (B, T') 1 for real positions
    loss: torch.Tensor | None = None      # mean next-token loss over supervised positions
    loss_sum: torch.Tensor | None = None  # summed loss (for normalising by a global token count)
    num_tokens: int = 0                   # supervised positions in this batch

    @cached_property
    def logits(self) -> torch.Tensor:
        if self.hidden is None:
            raise ValueError("this output comes from forward(loss_only=True), which computes the loss only; "
                             "call forward without loss_only for hidden states and logits")
        return self.head(self.hidden).float()  # (B, T', vocab)


class LLaVA(nn.Module):
    """DINOv2 -> Projector -> InternLM2. Reference: transformers `models/llava/modeling_llava.py`."""

    def __init__(self, llm: InternLM2, vit: DINOv2, projector: Projector, config: LLaVAConfig | None = None):
        super().__init__()
        self.llm, self.vit, self.projector = llm, vit, projector
        self.config = config or LLaVAConfig()

    # ------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, llm=None, vit=None, projector=None,
                        dtype: torch.dtype | None = None, device="cpu") -> "LLaVA":
        """`LLaVA.from_pretrained(out_dir)` for a folder written by train.py / finetune.py, or
        `LLaVA.from_pretrained(llm=dir, vit=dir, projector=dir)`; without a projector it is freshly initialised."""
        config = LLaVAConfig()
        if path is not None:
            path = Path(path)
            if not (path / CONFIG_FILE).exists():
                raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; a LLaVA folder written by train.py holds "
                                        f"{CONFIG_FILE}, llm/, vit/ and projector/. For separate parts use "
                                        "LLaVA.from_pretrained(llm=..., vit=..., projector=...)")
            config = LLaVAConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
            llm, vit, projector = path / "llm", path / "vit", path / "projector"
        if llm is None or vit is None:
            raise ValueError("LLaVA.from_pretrained needs a LLaVA folder, or both llm= and vit= folders")
        llm_model = InternLM2.from_pretrained(llm, dtype=dtype, device=device)
        vit_model = DINOv2.from_pretrained(vit, dtype=dtype, device=device)
        if projector is not None:
            proj = Projector.from_pretrained(projector, dtype=dtype, device=device)
        else:
            proj = Projector(vit_model.config.hidden_size, llm_model.config.hidden_size).to(device)
            if dtype is not None:
                proj = proj.to(dtype)
        proj_in, proj_out = proj.model[0].in_features, proj.model[-1].out_features
        if (proj_in, proj_out) != (vit_model.config.hidden_size, llm_model.config.hidden_size):
            raise ValueError(f"{projector}: projector maps {proj_in} -> {proj_out}, but the ViT width is "
                             f"{vit_model.config.hidden_size} and the LLM width {llm_model.config.hidden_size}")
        return cls(llm_model, vit_model, proj, config)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write llm/ (InternLM2), vit/ (DINOv2), projector/ (XTuner) and llava_config.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.llm.save_pretrained(path / "llm", max_shard_bytes=max_shard_bytes)
        self.vit.save_pretrained(path / "vit")
        self.projector.save_pretrained(path / "projector")
        write_json(asdict(self.config), path / CONFIG_FILE)

    def set_gradient_checkpointing(self, flag: bool = True) -> None:
        self.llm.set_gradient_checkpointing(flag)
        self.vit.set_gradient_checkpointing(flag)

    # ------------------------------------------------------------------------------------------------
    # Forward

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, H, W) -> (n_images, N, D_llm) projected patch features.

        pixel_values: normalised floats (image.preprocess), or uint8 pixels (image.to_pixels, what the
        training data set yields), normalised here, on the model's device."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize(pixel_values)
        vit_trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.vit.parameters())
        with torch.set_grad_enabled(vit_trains):
            vit_dtype = self.vit.embeddings.patch_embeddings.projection.weight.dtype
            feats = self.vit.features(pixel_values.to(vit_dtype), layer=self.config.select_layer)
        return self.projector(feats.to(self.projector.model[0].weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
        """Splice image features into the token embeddings.

        input_ids (B, T) with one -200 per image; pixel_values (n_images, 3, H, W) in row-major order.
        Returns embeds (B, T', D), labels (B, T') or None, attention_mask (B, T').
        Each row keeps its padding where it was (right padding stays right, left stays left).
        """
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_image = input_ids == IMAGE_TOKEN_INDEX                          # (B, T)
        n_placeholders = int(is_image.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_placeholders != n_images:
            per_row = is_image.sum(1).tolist()
            raise ValueError(f"input_ids hold {n_placeholders} image placeholders ({IMAGE_TOKEN_INDEX}) "
                             f"(per batch row: {per_row}) but pixel_values has {n_images} images; each "
                             "image needs exactly one placeholder, in order")
        text = self.llm.embed(input_ids.masked_fill(is_image, 0))          # (B, T, D)
        if n_images:
            images = self.image_features(pixel_values)                      # (n_images, N, D)
        else:
            images = self._dummy_image_features()                           # (0 or 1, N, D)
        images = images.to(text.dtype)
        N = images.shape[1]
        D = text.shape[-1]

        # Where each input position starts in the output row: text tokens take 1 slot, images N.
        width = torch.where(is_image, N, 1)                                 # (B, T)
        start = torch.cumsum(width, 1) - width                              # (B, T)
        out_len = width.sum(1)                                              # (B,)
        T_out = int(out_len.max())

        # Gather table: rows 0..B*T-1 are text embeddings, then image vectors, then one zero row.
        bank = torch.cat([text.reshape(B * T, D), images.reshape(-1, D), text.new_zeros(1, D)])
        zero_row = bank.shape[0] - 1
        src = torch.full((B, T_out), zero_row, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)[:, None].expand(B, T)
        text_pos = ~is_image
        src[rows[text_pos], start[text_pos]] = (rows * T + torch.arange(T, device=device))[text_pos]
        if n_images:
            img_b, img_t = is_image.nonzero(as_tuple=True)                  # row-major = image order
            offs = torch.arange(N, device=device)
            cols = start[img_b, img_t][:, None] + offs                      # (n_images, N)
            src[img_b[:, None].expand_as(cols), cols] = B * T + torch.arange(n_images * N, device=device).view(-1, N)
        embeds = bank[src]                                                  # (B, T', D)
        if not n_images and images.shape[0]:
            embeds = embeds + 0.0 * images.sum()  # keeps projector (and ViT) in the graph: no DDP unused-param hang

        mask = torch.zeros(B, T_out, dtype=attention_mask.dtype, device=device)
        mask[rows, start] = attention_mask
        if n_images:
            mask[img_b[:, None].expand_as(cols), cols] = attention_mask[img_b, img_t][:, None].expand_as(cols)
        new_labels = None
        if labels is not None:
            new_labels = torch.full((B, T_out), IGNORE_INDEX, dtype=labels.dtype, device=device)
            new_labels[rows[text_pos], start[text_pos]] = labels[text_pos]
        return embeds, new_labels, mask

    def _dummy_image_features(self) -> torch.Tensor:
        """A batch without images still runs a trainable projector (and ViT) on a tiny input, so every rank
        uses the same parameters every step (XTuner's zero-image trick; nanoVLM skips such batches instead)."""
        trainable = torch.is_grad_enabled() and any(
            p.requires_grad for m in (self.projector, self.vit) for p in m.parameters())
        if not trainable:
            D = self.projector.model[-1].out_features
            return self.projector.model[0].weight.new_zeros(0, 1, D)
        p = self.vit.config.patch_size
        pixels = self.projector.model[0].weight.new_zeros(1, 3, p, p)
        return self.image_features(pixels)[:, :0]                           # (1, 0, D): no slots, still in graph

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                loss_chunk: int = 1024, loss_only: bool = False) -> LLaVAOutput:
        """loss_only=True (training, with labels): compute what the loss needs and nothing else. The LLM's last
        layer then runs its output projection, feed-forward and final norm on the supervised positions alone
        (`InternLM2.forward_hidden(keep=...)`): 10% of a step on bench/train_step.py's 6-layer model, about
        1/layers of the LLM's work in general. out.hidden and out.logits are not available then."""
        if loss_only and labels is None:
            raise ValueError("loss_only=True needs labels")
        embeds, labels, mask = self.embed(input_ids, pixel_values, labels, attention_mask)
        # Right padding (what `collate` makes) needs no mask: causal attention already keeps the trailing pads
        # away from every real position, and the kernel's causal fast path is quicker than an explicit mask.
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
        mask_arg = None if right_padded else mask
        if loss_only:
            supervised, targets = _supervised(labels)                       # (B, T') positions with a target
            h = self.llm.forward_hidden(embeds, attention_mask=mask_arg, keep=supervised)   # (n, D)
            out = LLaVAOutput(hidden=None, head=self.llm.output, labels=labels, attention_mask=mask)
            out.loss_sum, out.num_tokens = self._loss_over(h, targets, loss_chunk)
        else:
            hidden = self.llm.forward_hidden(embeds, attention_mask=mask_arg)
            out = LLaVAOutput(hidden=hidden, head=self.llm.output, labels=labels, attention_mask=mask)
            if labels is not None:
                out.loss_sum, out.num_tokens = self.loss_sum(hidden, labels, loss_chunk)
        if labels is not None:
            out.loss = out.loss_sum / max(out.num_tokens, 1)
        return out

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 1024):
        """Summed next-token cross-entropy over supervised positions, and their count, from (B, T', D) states."""
        supervised, targets = _supervised(labels)
        return self._loss_over(hidden[supervised], targets, chunk)

    def _loss_over(self, h: torch.Tensor, t: torch.Tensor, chunk: int):
        """Summed cross-entropy of the supervised states h (n, D) against their targets t (n,), and n.

        Only supervised positions go through the output head, `chunk` rows at a time, each chunk recomputed
        in backward (checkpoint), so neither the (B, T, vocab) logits nor their fp32 softmax ever exist whole.
        """
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            hc, tc = h[i:i + chunk], t[i:i + chunk]
            if torch.is_grad_enabled() and hc.requires_grad:
                total = total + checkpoint(self._chunk_loss, hc, tc, use_reentrant=False)
            else:
                total = total + self._chunk_loss(hc, tc)
        if h.shape[0] == 0:  # no supervised token: a zero loss through the head that still reaches every weight
            total = total + 0.0 * self.llm.output(h).sum()
        return total, int(t.numel())

    def _chunk_loss(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.llm.output(h).float(), t, reduction="sum")

    # ------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 attention_mask: torch.Tensor | None = None, stop_ids: list[int] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each row; returns (B, n) new ids only. A row ends at a stop id (kept) and is padded
        with the first stop id afterwards. temperature 0 = greedy; otherwise sampling with top-p."""
        stop = torch.tensor(stop_ids if stop_ids is not None else self.config.stop_ids, device=input_ids.device)
        embeds, _, mask = self.embed(input_ids, pixel_values, None, attention_mask)
        embeds, mask = _left_align(embeds, mask)                            # generation appends on the right
        B, T, _ = embeds.shape
        cache = self.llm.new_cache(B, T + max_new_tokens, dtype=embeds.dtype, device=embeds.device)
        full_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)  # (B, T + max_new)
        positions = (torch.cumsum(full_mask, 1) - 1).clamp(min=0)           # left padding -> first real pos 0
        # The prompt: every position fills the cache, but only the last one's output is needed (keep).
        last = torch.zeros(B, T, dtype=torch.bool, device=embeds.device)
        last[:, -1] = True
        hidden = self.llm.forward_hidden(embeds, attention_mask=full_mask[:, :T], position_ids=positions[:, :T],
                                         cache=cache, keep=last)                # (B, D)
        out = torch.full((B, max_new_tokens), int(stop[0]), dtype=torch.long, device=input_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        n = 0
        for step in range(max_new_tokens):
            logits = self.llm.output(hidden.reshape(B, -1)).float()        # (B, vocab)
            if self.config.text_vocab_size is not None:                     # padded vocabulary: ids with no text
                logits[:, self.config.text_vocab_size:] = float("-inf")
            token = _pick(logits, temperature, top_p, generator)
            token = torch.where(done, stop[0], token)
            out[:, step] = token
            n = step + 1
            done |= torch.isin(token, stop)
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            p = T + step
            hidden = self.llm.forward_hidden(self.llm.embed(token[:, None]), attention_mask=full_mask[:, :p + 1],
                                             position_ids=positions[:, p:p + 1], cache=cache)
        return out[:, :n]


def _supervised(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose next token is supervised, (B, T) bool (position t predicts token t + 1), and
    those next tokens, (n,) in row-major order."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep, labels[:, 1:][keep[:, :-1]]


def _left_align(embeds: torch.Tensor, mask: torch.Tensor):
    """Move each row's real positions to the right end (left padding), keeping their order."""
    B, T, D = embeds.shape
    # Stable sort on the mask: padding (0) first, real positions (1) after, each group in its order.
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices     # (B, T)
    embeds = torch.gather(embeds, 1, order[..., None].expand(B, T, D))
    return embeds, torch.gather(mask, 1, order)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_p, -1) - sorted_p > top_p                # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

"""Images: any file decoded to upright RGB (`load_image`), and the two ways LLaVA turns it into ViT
input.

`to_pixels` gives uint8 (3, size, size), as the data set hands it out (a quarter of float32's bytes
through shared memory and to the GPU); the model calls `normalize` on its device; `preprocess` does
both. Modes: "pad" is LLaVA-1.5 / XTuner's expand2square (filled with the tower's mean colour),
then a bicubic resize; "crop" is the tower's own processor (DINOv2: 256 edge, 224 crop, scaled;
CLIP: shortest edge, centre crop; SigLIP: a plain resize). Each tower says its statistics and crop
in a `Preprocessing` (its config's `preprocessing`).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from . import LlavaMinError


@dataclass(frozen=True)
class Preprocessing:
    """A vision tower's image convention, as its hub preprocessor_config.json gives it."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # "crop" mode: the shortest edge resized (bicubic) to round(size * crop_ratio), then the centre
    # size x size; None: the whole image resized to size x size (SigLIP)
    crop_ratio: float | None

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """expand2square's fill: XTuner and LLaVA use tuple(int(x * 255) for x in image_mean)."""
        return tuple(int(m * 255) for m in self.mean)


# DINOv2's processor (facebook/dinov2-*): ImageNet statistics, the shortest edge to 256 before a
# 224 centre crop.
IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_ratio=256 / 224)


# Decoding

def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode `path` fully; EXIF orientation applied (a phone photo taken upright is upright),
    RGB."""
    path = os.fspath(path)
    try:
        # Image.open refuses more than 2x MAX_IMAGE_PIXELS and only warns above 1x: make the
        # warning an error too, so that a crafted file cannot exhaust a loader worker's memory.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not later inside the model
                image = ImageOps.exif_transpose(image)
                return to_rgb(image, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise LlavaMinError(f"{path}: refused as a possible decompression bomb ({e}); if the image is genuine, "
                            f"shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS})") from e
    except FileNotFoundError as e:
        raise LlavaMinError(f"{path}: image not found; check --image-folder and the sample's \"image\" path") from e
    except LlavaMinError:  # from to_rgb: already says what is wrong
        raise
    # SyntaxError, ValueError: from some plugins' header parsers
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow: a truncated or corrupt stream is an OSError, a file that is no image its
        # UnidentifiedImageError.
        hint = ("the file is truncated; re-download or re-extract it" if "truncated" in str(e) else
                "it is not a readable image; re-download it, or remove the sample from the data")
        raise LlavaMinError(f"{path}: cannot decode image ({type(e).__name__}: {e}); {hint}") from e


def to_rgb(image: Image.Image, name: str = "<image>") -> Image.Image:
    """Any Pillow mode -> RGB: palette (with its transparency), RGBA/LA/PA composited on white (as
    transformers' convert_to_rgb), grayscale, CMYK, 16/32-bit integers scaled from their full
    range."""
    # A palette may mark one index (or several, via a tRNS table) transparent
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")  # RGBa/La (premultiplied) are un-premultiplied by convert
        # White, as transformers' convert_to_rgb
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # Pillow's convert("RGB") clips these to 0..255, turning a 16-bit scan white. 'I' (32-bit)
        # is how Pillow widens 16-bit data, so both are read on the 0..65535 scale.
        values = np.asarray(image.convert("I"), dtype=np.float64)  # (H, W)
        # 65535 / 257 = 255 exactly
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if mode == "F":
        # Float images have no fixed range; follow transformers (to_pil_image): values in [0, 1]
        # are scaled by 255, integer-valued data in [0, 255] is taken as is, anything else is an
        # error.
        values = np.asarray(image, dtype=np.float64)
        if values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255.0
        elif not (values.size == 0 or (values.min() >= 0 and values.max() <= 255)):
            raise LlavaMinError(f"{name}: float image with values in [{values.min()}, {values.max()}]; "
                                f"save it as an 8-bit image (or scale it to [0, 1])")
        gray = np.rint(values).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, HSV, ...
    except ValueError as e:
        raise LlavaMinError(f"{name}: cannot convert Pillow mode {image.mode!r} to RGB ({e}); "
                            f"save the image as 8-bit RGB") from e


# ViT input

def expand2square(image: Image.Image, background: tuple[int, int, int] = IMAGENET.pad_color) -> Image.Image:
    """Pad to a square of side max(w, h) filled with `background`, the image centred (LLaVA /
    XTuner)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def resize_shortest_edge(image: Image.Image, shortest: int) -> Image.Image:
    """Bicubic resize so the shorter side is `shortest`, the long side floored (transformers'
    rounding)."""
    width, height = image.size
    # PIL sizes are (width, height)
    if width <= height:
        new_size = (shortest, int(shortest * height / width))
    else:
        new_size = (int(shortest * width / height), shortest)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop size x size from the centre; offsets floored as transformers' center_crop does."""
    # >= size: resize_shortest_edge made the short side round(size * crop_ratio)
    width, height = image.size
    left = (width - size) // 2
    top = (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def check_image_size(height: int, width: int, patch_size: int) -> None:
    """The one check of an input size against a tower's patch size (train.py's --image-size, the
    towers' inputs)."""
    if height < patch_size or width < patch_size or height % patch_size or width % patch_size:
        side = max(1, round(max(height, width) / patch_size)) * patch_size
        raise LlavaMinError(f"image height {height} and width {width} must both be positive multiples of the ViT "
                            f"patch size {patch_size}; use e.g. --image-size {side}, or resize the image to one")


def to_pixels(image: Image.Image, size: int, mode: str = "pad", preprocessing: Preprocessing = IMAGENET
              ) -> torch.Tensor:
    """An image -> uint8 tensor (3, size, size): RGB, padded ("pad") or the tower's crop ("crop"),
    resized."""
    if size <= 0:
        raise LlavaMinError(f"image size {size} must be positive")
    image = to_rgb(image)
    if mode == "pad":
        square = expand2square(image, preprocessing.pad_color)
        image = square.resize((size, size), Image.Resampling.BICUBIC)
    elif mode == "crop" and preprocessing.crop_ratio is None:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    elif mode == "crop":
        image = center_crop(resize_shortest_edge(image, round(size * preprocessing.crop_ratio)), size)
    else:
        raise LlavaMinError(f"unknown image mode {mode!r}; use 'pad' or 'crop'")
    # (size, size, 3) -> (3, size, size)
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())


def normalize(pixels: torch.Tensor, preprocessing: Preprocessing = IMAGENET) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 ViT input: scaled to [0, 1], then the tower's mean
    and std."""
    if pixels.dtype != torch.uint8:
        raise LlavaMinError(f"normalize takes uint8 pixels (0..255), got {pixels.dtype}")
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def preprocess(image: Image.Image, size: int, mode: str = "pad", preprocessing: Preprocessing = IMAGENET
               ) -> torch.Tensor:
    """An image -> normalised FloatTensor (3, size, size) for the ViT."""
    return normalize(to_pixels(image, size, mode, preprocessing), preprocessing)

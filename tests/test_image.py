"""Image decoding and preprocessing.

Proves that `preprocess(..., "crop")` equals transformers' DINOv2 image processor (BitImageProcessor with the
facebook/dinov2-* settings) on non-square images at 224 and at a small size, that "pad" equals a
hand-written LLaVA expand2square + bicubic resize, that every Pillow mode decodes to the RGB a person would
expect (alpha on white, 16-bit scaled, CMYK, palette transparency), that EXIF orientation is applied, and
that truncated, non-image, missing and decompression-bomb files raise LlavaMinError naming the path.
"""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from llava_min import LlavaMinError
from llava_min.clip import PREPROCESSING as CLIP_PREPROCESSING
from llava_min.image import check_image_size, load_image, preprocess, to_pixels
from llava_min.siglip import PREPROCESSING as SIGLIP_PREPROCESSING

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    # smooth content plus noise, so resampling differences would show
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    noise = rng.integers(-40, 40, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def dinov2_processor(shortest_edge=256, crop=224):
    """transformers' BitImageProcessor with facebook/dinov2-base's preprocessor_config.json values."""
    try:  # transformers >= 5: the PIL/numpy backend has its own class
        from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: BitImageProcessor itself is PIL/numpy
        from transformers import BitImageProcessor as Processor
    return Processor(do_resize=True, size={"shortest_edge": shortest_edge}, resample=3,  # PIL bicubic
                     do_center_crop=True, crop_size={"height": crop, "width": crop},
                     do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True)


@pytest.mark.parametrize("height,width", [(300, 457), (411, 263)])
def test_crop_matches_transformers_dinov2_processor(height, width):
    image = random_image(height, width)
    expected = dinov2_processor()(image, return_tensors="np")["pixel_values"][0]
    ours = preprocess(image, 224, mode="crop")
    assert ours.dtype == torch.float32 and ours.shape == (3, 224, 224)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5, rtol=0)


def test_crop_matches_transformers_at_small_size():
    image = random_image(75, 130, seed=1)
    # 56 px keeps DINOv2's 256/224 ratio: shortest edge round(56 * 256 / 224) = 64
    expected = dinov2_processor(shortest_edge=64, crop=56)(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image, 56, mode="crop").numpy(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("height,width", [(40, 70), (90, 31), (50, 50)])
def test_pad_matches_expand2square_reference(height, width):
    image = random_image(height, width, seed=2)
    # LLaVA-1.5 / XTuner expand2square, written out: mean colour canvas, image pasted centred
    fill = tuple(int(m * 255) for m in MEAN)  # (123, 116, 103)
    side = max(height, width)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    resized = np.asarray(canvas.resize((56, 56), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    expected = ((resized - MEAN) / STD).transpose(2, 0, 1)
    ours = preprocess(image, 56, mode="pad")
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6, rtol=0)
    if height != width:  # the padding really is the mean colour, i.e. ~0 after normalisation
        assert ours[:, 0, 0].abs().max() < 0.02, ours[:, 0, 0]


def test_size_not_multiple_of_patch_and_unknown_mode():
    image = random_image(30, 30)
    with pytest.raises(LlavaMinError, match=r"height 50 and width 50 .*patch size 14; use e.g. --image-size 56"):
        check_image_size(50, 50, 14)
    check_image_size(32, 48, 16)
    with pytest.raises(LlavaMinError, match="stretch"):
        preprocess(image, 28, mode="stretch")
    assert preprocess(image, 32, mode="pad").shape == (3, 32, 32)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("height,width", [(300, 457), (411, 263)])
def test_crop_matches_the_towers_own_processor(tower, height, width):
    """CLIP: shortest edge to the size, centre crop, OpenAI statistics; SigLIP: a square resize, mean/std 0.5."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image = random_image(height, width, seed=3)
    if tower == "clip":
        processor = CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
        preprocessing = CLIP_PREPROCESSING
    else:
        processor = SiglipImageProcessorPil(size={"height": 112, "width": 112})
        preprocessing = SIGLIP_PREPROCESSING
    expected = processor(image, return_tensors="np")["pixel_values"][0]
    ours = preprocess(image, 112, mode="crop", preprocessing=preprocessing)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5, rtol=0)


def test_pad_fills_with_the_towers_mean_colour():
    ours = to_pixels(random_image(20, 60), 28, mode="pad", preprocessing=SIGLIP_PREPROCESSING)
    assert ours[:, 0, 0].tolist() == [127, 127, 127]
    assert to_pixels(random_image(20, 60), 28, mode="pad")[:, 0, 0].tolist() == [123, 116, 103]


# --------------------------------------------------------------------------------------------------
# modes

def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_palette_with_transparency_composites_on_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    image.paste(1, (0, 0, 4, 8))                         # left half blue
    path = save(image, tmp_path / "p.png", transparency=1)  # blue marked transparent
    rgb = np.asarray(load_image(path))
    assert load_image(path).mode == "RGB"
    assert (rgb[:, :4] == 255).all(), "transparent palette entry must become the white background"
    assert (rgb[:, 4:] == [255, 0, 0]).all()


def test_rgba_and_la_alpha_on_white(tmp_path):
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 0] = 200                     # red channel
    rgba[:, :3, 3] = 0                     # left: fully transparent
    rgba[:, 3:, 3] = 255                   # right: opaque
    rgb = np.asarray(load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
    assert (rgb[:, :3] == 255).all() and (rgb[:, 3:] == [200, 0, 0]).all()

    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0] = 40
    la[..., 1] = 128                       # half transparent gray 40 over white
    rgb = np.asarray(load_image(save(Image.fromarray(la, "LA"), tmp_path / "la.png")))
    assert rgb.shape == (4, 4, 3)
    assert np.all(np.abs(rgb.astype(int) - (40 * 128 + 255 * 127) / 255) <= 1)


def test_grayscale_cmyk_and_16_bit(tmp_path):
    gray = Image.fromarray(np.full((5, 7), 77, np.uint8), "L")
    assert (np.asarray(load_image(save(gray, tmp_path / "l.png"))) == 77).all()

    cmyk = Image.new("CMYK", (5, 5), (0, 255, 255, 0))  # pure red in CMYK
    rgb = np.asarray(load_image(save(cmyk, tmp_path / "c.jpg", quality=100)))
    assert rgb.shape == (5, 5, 3)
    assert rgb[..., 0].min() > 230 and rgb[..., 1:].max() < 25, rgb[0, 0]

    ramp = np.array([[0, 257 * 100, 65535, 30000]], np.uint16)  # 16-bit values
    path = save(Image.fromarray(ramp), tmp_path / "g16.png")
    with Image.open(path) as stored:
        assert stored.mode in ("I;16", "I")
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (1, 4, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0, :, 0].tolist() == [0, 100, 255, round(30000 / 257)]  # scaled, not clipped at 255

    wide = Image.fromarray(np.array([[0, 65535]], np.int32))
    assert np.asarray(load_image(save(wide, tmp_path / "i.tif")))[0, :, 1].tolist() == [0, 255]


def test_exif_orientation_applied(tmp_path):
    array = np.zeros((10, 20, 3), np.uint8)
    array[:, :10] = [255, 0, 0]             # left half red, right half green (stored orientation)
    array[:, 10:] = [0, 255, 0]
    exif = Image.Exif()
    exif[0x0112] = 6                        # Orientation 6: display rotated 90 degrees clockwise
    path = save(Image.fromarray(array), tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    image = load_image(path)
    assert image.size == (10, 20), "width and height swap after the rotation"
    rgb = np.asarray(image).astype(int)
    # rotating clockwise puts the stored left (red) half on top
    assert rgb[2, 5, 0] > 200 and rgb[2, 5, 1] < 60
    assert rgb[17, 5, 1] > 200 and rgb[17, 5, 0] < 60


# --------------------------------------------------------------------------------------------------
# bad files

def test_truncated_file_raises_naming_path(tmp_path):
    buffer = io.BytesIO()
    random_image(64, 64).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(LlavaMinError, match=rf"{path}.*truncated"):
        load_image(path)


def test_non_image_and_missing_file_raise_naming_path(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(LlavaMinError, match=rf"{path}.*not a readable image"):
        load_image(path)
    with pytest.raises(LlavaMinError, match=rf"{tmp_path / 'absent.jpg'}.*not found.*--image-folder"):
        load_image(tmp_path / "absent.jpg")


def png_header_only(width, height):
    """A 60-byte PNG that declares width x height (a decompression bomb needs no more to be refused)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_raises_naming_path(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))  # 10^10 pixels: far past 2 x MAX_IMAGE_PIXELS
    with pytest.raises(LlavaMinError, match=rf"{bomb}.*decompression bomb.*MAX_IMAGE_PIXELS"):
        load_image(bomb)

    # Between 1x and 2x the limit Pillow only warns; that must be an error too.
    path = save(random_image(40, 40), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over 1x, under 2x
    with pytest.raises(LlavaMinError, match=rf"{path}.*decompression bomb"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert load_image(path).size == (40, 40)

"""The loss picture: drawn from metrics.jsonl with Pillow, a log axis for losses that fall by orders of
magnitude, non-finite losses left out, and a placeholder before there are two steps."""
import json

from PIL import Image

from llava_min.plot import plot_loss


def write(path, losses):
    path.write_text("".join(json.dumps({"step": i + 1, "loss": v, "lr": 1e-3}) + "\n" for i, v in enumerate(losses)))


def test_draws_a_curve(tmp_path):
    write(tmp_path / "m.jsonl", [7.0 * 0.97 ** i for i in range(200)] + [float("nan")])
    plot_loss(tmp_path / "m.jsonl", tmp_path / "loss.png")
    img = Image.open(tmp_path / "loss.png").convert("RGB")
    assert img.size == (640, 360)
    colours = {c for _, c in img.getcolors(1 << 16)}
    assert (20, 60, 160) in colours                     # the smoothed line is there
    assert not list(tmp_path.glob(".*.tmp"))            # written atomically, nothing left over


def test_placeholder_before_two_steps(tmp_path):
    write(tmp_path / "m.jsonl", [5.0])
    plot_loss(tmp_path / "m.jsonl", tmp_path / "loss.png")
    colours = {c for _, c in Image.open(tmp_path / "loss.png").convert("RGB").getcolors(1 << 16)}
    assert (20, 60, 160) not in colours

"""The loss curve as a PNG, drawn with Pillow alone (no matplotlib dependency)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

W = 640
H = 360
MARGIN = 48
RAW_COLOUR = (170, 190, 230)      # the loss of each step
SMOOTH_COLOUR = (20, 60, 160)     # its moving average


def _identity(value: float) -> float:
    return value


def plot_loss(metrics_file: str | Path, out_png: str | Path, title: str = "training loss") -> None:
    """Read metrics.jsonl ({"step", "loss"} per line) and draw loss against step, with a smoothed line."""
    points = []
    for line in Path(metrics_file).read_text().splitlines():
        rec = json.loads(line)
        if math.isfinite(rec.get("loss", math.nan)):
            points.append((rec["step"], rec["loss"]))
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN, 12), title, fill="black")
    if len(points) < 2:
        draw.text((MARGIN, H // 2), "not enough steps yet", fill="gray")
        _save(img, out_png)
        return
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    # A loss that falls by orders of magnitude reads better on a log axis.
    log_axis = min(losses) > 0 and max(losses) / min(losses) > 20
    f = _identity
    if log_axis:
        f = math.log10
    x0 = min(steps)
    x1 = max(steps)
    y0 = f(min(losses))
    y1 = f(max(losses))
    if y1 <= y0:              # a flat loss: a unit-high axis around it
        y1 = y0 + 1.0

    def xy(step, loss):
        x = MARGIN + (step - x0) / max(x1 - x0, 1) * (W - 2 * MARGIN)
        y = H - MARGIN - (f(loss) - y0) / (y1 - y0) * (H - 2 * MARGIN)
        return x, y

    def unplot(value):
        """The loss whose plotted value is `value`."""
        if log_axis:
            return 10 ** value
        return value

    draw.rectangle([MARGIN, MARGIN, W - MARGIN, H - MARGIN], outline="black")
    for frac in (0.0, 0.5, 1.0):  # axis labels at the ends and the middle
        loss = unplot(y0 + frac * (y1 - y0))
        draw.text((4, xy(x0, loss)[1] - 6), f"{loss:.3g}", fill="black")
        step = round(x0 + frac * (x1 - x0))
        draw.text((xy(step, min(losses))[0] - 8, H - MARGIN + 6), str(step), fill="black")
    draw.line([xy(s, v) for s, v in points], fill=RAW_COLOUR, width=1)
    # Exponential moving average over ~1/50 of the run, of the plotted value (the log on a log axis, so a
    # spike does not lift the line), debiased as TensorBoard does so that it starts on the data.
    beta = 1.0 - min(1.0, 50 / len(points))
    smooth = []
    ema = 0.0
    for t, (s, v) in enumerate(points, 1):
        ema = beta * ema + (1 - beta) * f(v)
        smooth.append(xy(s, unplot(ema / (1 - beta ** t))))
    draw.line(smooth, fill=SMOOTH_COLOUR, width=2)
    draw.text((W - MARGIN - 40, H - 20), "step", fill="black")
    if log_axis:
        draw.text((MARGIN + 160, 12), "(loss on a log scale)", fill="gray")
    _legend(draw)
    _save(img, out_png)


def _legend(draw: ImageDraw.ImageDraw) -> None:
    """Which line is which, in the top right corner above the plot."""
    x = W - MARGIN - 190
    entries = [(RAW_COLOUR, 1, "loss per step"), (SMOOTH_COLOUR, 2, "moving average")]
    for k, (colour, width, label) in enumerate(entries):
        y = 10 + 14 * k
        draw.line([(x, y + 6), (x + 24, y + 6)], fill=colour, width=width)
        draw.text((x + 30, y), label, fill="black")


def _save(img: Image.Image, out_png: str | Path) -> None:
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(out_png)

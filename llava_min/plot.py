"""The loss curve as a PNG, drawn with Pillow alone (no matplotlib dependency)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

W, H, MARGIN = 640, 360, 48


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
    steps, losses = zip(*points)
    # A loss that falls by orders of magnitude reads better on a log axis.
    log_axis = min(losses) > 0 and max(losses) / min(losses) > 20
    f = math.log10 if log_axis else (lambda v: v)
    x0, x1 = min(steps), max(steps)
    y0, y1 = f(min(losses)), f(max(losses))
    y1 = y1 if y1 > y0 else y0 + 1.0

    def xy(step, loss):
        x = MARGIN + (step - x0) / max(x1 - x0, 1) * (W - 2 * MARGIN)
        y = H - MARGIN - (f(loss) - y0) / (y1 - y0) * (H - 2 * MARGIN)
        return x, y

    draw.rectangle([MARGIN, MARGIN, W - MARGIN, H - MARGIN], outline="black")
    for frac in (0.0, 0.5, 1.0):  # axis labels at the ends and the middle
        value = y0 + frac * (y1 - y0)
        loss = 10 ** value if log_axis else value
        draw.text((4, xy(x0, loss)[1] - 6), f"{loss:.3g}", fill="black")
        step = round(x0 + frac * (x1 - x0))
        draw.text((xy(step, min(losses))[0] - 8, H - MARGIN + 6), str(step), fill="black")
    draw.line([xy(s, v) for s, v in points], fill=(170, 190, 230), width=1)
    # Exponential moving average over ~1/50 of the run, of the plotted value (the log on a log axis, so a
    # spike does not lift the line), debiased as TensorBoard does so that it starts on the data.
    beta = 1.0 - min(1.0, 50 / len(points))
    smooth, ema = [], 0.0
    for t, (s, v) in enumerate(points, 1):
        ema = beta * ema + (1 - beta) * f(v)
        value = ema / (1 - beta ** t)
        smooth.append(xy(s, 10 ** value if log_axis else value))
    draw.line(smooth, fill=(20, 60, 160), width=2)
    draw.text((W - MARGIN - 40, H - 20), "step", fill="black")
    if log_axis:
        draw.text((MARGIN + 160, 12), "(loss on a log scale)", fill="gray")
    _save(img, out_png)


def _save(img: Image.Image, out_png: str | Path) -> None:
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(out_png)

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
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(losses), max(losses)
    y1 = y1 if y1 > y0 else y0 + 1.0

    def xy(step, loss):
        x = MARGIN + (step - x0) / max(x1 - x0, 1) * (W - 2 * MARGIN)
        y = H - MARGIN - (loss - y0) / (y1 - y0) * (H - 2 * MARGIN)
        return x, y

    draw.rectangle([MARGIN, MARGIN, W - MARGIN, H - MARGIN], outline="black")
    for frac in (0.0, 0.5, 1.0):  # axis labels at the ends and the middle
        loss = y0 + frac * (y1 - y0)
        draw.text((4, xy(x0, loss)[1] - 6), f"{loss:.3g}", fill="black")
        step = round(x0 + frac * (x1 - x0))
        draw.text((xy(step, y0)[0] - 8, H - MARGIN + 6), str(step), fill="black")
    draw.line([xy(s, v) for s, v in points], fill=(170, 190, 230), width=1)
    smooth, ema = [], losses[0]
    for s, v in points:  # exponential moving average, window ~ 1/20 of the run
        ema += (v - ema) * min(1.0, 20 / len(points))
        smooth.append(xy(s, ema))
    draw.line(smooth, fill=(20, 60, 160), width=2)
    draw.text((W - MARGIN - 120, H - 20), "step", fill="black")
    _save(img, out_png)


def _save(img: Image.Image, out_png: str | Path) -> None:
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(out_png)

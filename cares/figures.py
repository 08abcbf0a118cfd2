"""Figures drawn with Pillow only (no matplotlib): the qualitative comparison of the paper's Fig. 6
and a training-curve line plot.

Fig. 6 colour code for a prediction against the ground truth:
    true positive  white     false positive  red
    false negative blue      true negative   black
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TP_COLOUR = (255, 255, 255)
FP_COLOUR = (255, 0, 0)
FN_COLOUR = (0, 0, 255)
TN_COLOUR = (0, 0, 0)
SERIES_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
                  (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def error_map(prediction: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: TP white, FP red, FN blue, TN black (Fig. 6 of the paper)."""
    prediction = np.asarray(prediction, dtype=bool)
    ground_truth = np.asarray(ground_truth, dtype=bool)
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {ground_truth.shape} differ in shape")
    rgb = np.zeros((*prediction.shape, 3), dtype=np.uint8)
    rgb[prediction & ground_truth] = TP_COLOUR
    rgb[prediction & ~ground_truth] = FP_COLOUR
    rgb[~prediction & ground_truth] = FN_COLOUR
    return rgb


def _to_rgb(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3:
        return Image.fromarray(array.astype(np.uint8), mode="RGB")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = np.rint(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(array, mode="L").convert("RGB")


def qualitative_figure(path, rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], *,
                       threshold: float = 0.5, panel_height: int = 192) -> Path:
    """Write a Fig. 6-style PNG: one row per case with columns image | ground truth | prediction.

    rows: (name, image (H, W) in [0, 1], ground truth (H, W) bool, probability (H, W) in [0, 1]);
    the prediction column shows `probability >= threshold` coloured against the ground truth.
    """
    return comparison_figure(path, [(name, image, truth, [probability]) for name, image, truth, probability in rows],
                             ["prediction"], threshold=threshold, panel_height=panel_height)


def comparison_figure(path, rows: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[np.ndarray]]],
                      model_names: Sequence[str], *, threshold: float = 0.5, panel_height: int = 192) -> Path:
    """Fig. 6 of the paper for several models: one row per case, columns image | ground truth |
    one prediction per model (in `model_names` order), each `probability >= threshold` coloured
    against the ground truth.

    rows: (name, image (H, W) in [0, 1], ground truth (H, W) bool, [probability (H, W) per model]).
    """
    if not rows:
        raise ValueError("comparison_figure needs at least one row")
    for name, _, _, probabilities in rows:
        if len(probabilities) != len(model_names):
            raise ValueError(f"row {name!r} has {len(probabilities)} predictions for {len(model_names)} models")
    font = ImageFont.load_default()
    margin, header, label_width = 6, 20, 0
    titles = ["image", "ground truth", *model_names]
    panels = []
    for name, image, truth, probabilities in rows:
        truth = np.asarray(truth, dtype=bool)
        height, width = truth.shape
        panel_width = max(1, round(width * panel_height / height))
        # The rule of cares.metrics' threshold protocol.
        row = [_to_rgb(image), _to_rgb(truth)] + [
            Image.fromarray(error_map(np.asarray(probability) >= threshold, truth)) for probability in probabilities]
        # The CT image is smoothed when resized; the masks keep hard edges.
        panels.append((name, [p.resize((panel_width, panel_height), Image.BILINEAR if i == 0 else Image.NEAREST)
                              for i, p in enumerate(row)]))
        label_width = max(label_width, 6 * len(name) + 2 * margin)
    column_width = max(max(p.width for _, row in panels for p in row), max(6 * len(t) for t in titles))
    label_width = min(label_width, 160)
    canvas = Image.new("RGB", (label_width + len(titles) * (column_width + margin) + margin,
                               header + len(panels) * (panel_height + margin) + margin + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(titles):
        draw.text((label_width + margin + column * (column_width + margin), 4), title, fill="black", font=font)
    for index, (name, row) in enumerate(panels):
        top = header + index * (panel_height + margin)
        draw.text((margin, top + panel_height // 2 - 5), name[:25], fill="black", font=font)
        for column, panel in enumerate(row):
            canvas.paste(panel, (label_width + margin + column * (column_width + margin), top))
    draw.text((label_width + margin, canvas.height - 16),
              f"prediction = probability >= {threshold}: TP white, FP red, FN blue, TN black",
              fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def line_plot(path, series: dict[str, Sequence[tuple[float, float]]], *, title: str, x_label: str,
              y_label: str, size: tuple[int, int] = (640, 400)) -> Path:
    """A line plot with axes, ticks, axis labels, title and legend; series: name -> [(x, y), ...]."""
    points = [(x, y) for values in series.values() for x, y in values if math.isfinite(y)]
    if not points:
        raise ValueError("line_plot needs at least one finite point")
    font = ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 62, 20, 30, 46
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    if x_high == x_low:
        x_high = x_low + 1
    x_ticks, y_ticks = _nice_ticks(x_low, x_high), _nice_ticks(y_low, y_high * 1.05 or 1.0)
    x_low, x_high = min(x_low, x_ticks[0]), max(x_high, x_ticks[-1])
    y_low, y_high = min(y_low, y_ticks[0]), max(y_high, y_ticks[-1])

    def to_pixel(x, y):
        return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom))

    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 8), title, fill="black", font=font)
    for x in x_ticks:
        px, _ = to_pixel(x, y_low)
        draw.line([(px, top), (px, height - bottom)], fill=(230, 230, 230))
        draw.line([(px, height - bottom), (px, height - bottom + 4)], fill="black")
        draw.text((px - 8, height - bottom + 6), f"{x:g}", fill="black", font=font)
    for y in y_ticks:
        _, py = to_pixel(x_low, y)
        draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((4, py - 6), f"{y:.3g}", fill="black", font=font)
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black", width=1)
    draw.text(((left + width - right) // 2 - 3 * len(x_label), height - 18), x_label, fill="black", font=font)
    draw.text((4, top - 18), y_label, fill="black", font=font)
    for index, (name, values) in enumerate(series.items()):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        pixels = [to_pixel(x, y) for x, y in values if math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels if len(pixels) <= 50 else []:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        legend_y = top + 4 + 14 * index
        draw.line([(width - right - 130, legend_y + 6), (width - right - 110, legend_y + 6)], fill=colour, width=2)
        draw.text((width - right - 104, legend_y), name, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def training_curves(path, history: Sequence[dict]) -> Path:
    """Plot the training loss (and the validation Dice where measured) per epoch from log rows."""
    series = {"train loss": [(row["epoch"], row["train_loss"]) for row in history]}
    validated = [(row["epoch"], row["val_dice"]) for row in history
                 if row.get("val_dice") is not None and math.isfinite(row["val_dice"])]
    if validated:
        series["val Dice (threshold 0.5)"] = validated
    return line_plot(path, series, title="Training curve", x_label="epoch", y_label="loss / Dice")

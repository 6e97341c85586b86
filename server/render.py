"""PNG pictures for lessons: the similarity-matrix heatmap and the hits contact sheet."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchors of matplotlib's viridis: perceptually even and readable by the colour-blind.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def _colour(t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    lo = int(np.floor(t))
    hi = min(lo + 1, len(_VIRIDIS) - 1)
    mix = _VIRIDIS[lo] * (1 - (t - lo)) + _VIRIDIS[hi] * (t - lo)
    r, g, b = (round(float(c)) for c in mix)
    return r, g, b


def heatmap_png(matrix: np.ndarray, *, title: str = "cosine(image i, caption j)", cell: int = 56) -> bytes:
    """An N×N grid coloured by value, each cell printed, the diagonal outlined.

    Rows are images (I1..IN), columns are captions (T1..TN): the layout of CLIP's batch matrix.
    """
    n_rows, n_cols = matrix.shape
    font = ImageFont.load_default()
    margin, top = 40, 34
    width, height = margin + n_cols * cell + 10, top + 20 + n_rows * cell + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin, 6), title, fill="black", font=font)
    lo, hi = float(matrix.min()), float(matrix.max())
    span = hi - lo if hi > lo else 1.0
    for j in range(n_cols):
        draw.text((margin + j * cell + cell // 2 - 8, top), f"T{j + 1}", fill="black", font=font)
    for i in range(n_rows):
        y0 = top + 20 + i * cell
        draw.text((6, y0 + cell // 2 - 6), f"I{i + 1}", fill="black", font=font)
        for j in range(n_cols):
            x0 = margin + j * cell
            t = (float(matrix[i, j]) - lo) / span
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_colour(t))
            ink = "black" if t > 0.6 else "white"
            draw.text((x0 + 6, y0 + cell // 2 - 6), f"{matrix[i, j]:.2f}", fill=ink, font=font)
            if i == j:
                draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline="red", width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def contact_sheet_png(images: Sequence[Image.Image], labels: Sequence[str], *, tile: int = 128) -> bytes:
    """A row-major grid of thumbnails with a short caption under each."""
    cols = min(4, max(1, len(images)))
    rows = (len(images) + cols - 1) // cols
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (cols * (tile + 8) + 8, rows * (tile + 24) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (picture, label) in enumerate(zip(images, labels, strict=True)):
        thumb = picture.copy()
        thumb.thumbnail((tile, tile))
        x = 8 + (k % cols) * (tile + 8)
        y = 8 + (k // cols) * (tile + 24)
        sheet.paste(thumb, (x, y))
        draw.text((x, y + tile + 4), label[:24], fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()

"""PNG pictures for lessons: similarity-matrix heatmaps (alone or side by side) and the hits contact sheet.

Everything is drawn with Pillow's bundled scalable font, large enough to read in a chat client
that shows the picture shrunk: labels on both axes, the value in every cell in an ink that
contrasts with the cell, outlined cells of interest (the diagonal: the true pairs) and a colour
bar with its minimum and maximum.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchors of matplotlib's viridis: perceptually even and readable by the colour-blind.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
# Viridis has no red, so a red outline stands out on every cell.
OUTLINE = (230, 20, 20)
SPLIT_INK = (255, 255, 255)
NOT_FINITE = (150, 150, 150)  # a NaN or infinite cell: grey, outside the colour scale
MIN_CELL, MAX_CELL = 18, 72
# Below this a cell cannot hold "-0.12" legibly: the colour alone carries the value.
MIN_CELL_WITH_VALUE = 34
# Grids aim at about this many pixels across, so a 16×16 matrix (or a 32×32 joint one) stays on a screen.
TARGET_GRID = 960
BAR_WIDTH = 18
MAX_TEXT_WIDTH = 900
PAD = 10

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


_THREAD_FONTS = threading.local()


def basic_layout(bundled: Font) -> Font:
    """The same font with Pillow's basic layout (see `font`); a bitmap font has no other."""
    if isinstance(bundled, ImageFont.FreeTypeFont):
        return bundled.font_variant(layout_engine=ImageFont.Layout.BASIC)
    return bundled


def font(size: int) -> Font:
    """A font for drawing caller text (captions, file names) at `size` pixels.

    DejaVu Sans covers accented Latin, Greek and arrows; Pillow's bundled font (the fallback
    where DejaVu is not installed) draws little beyond ASCII. The layout is Pillow's basic one,
    not raqm: after some hostile captions raqm fails every later layout in the process (found by
    fuzzing), and a legend needs no shaping. One font object per thread, because a FreeType face
    must not be used by two threads at once, and tool calls render in parallel worker threads.
    """
    cache: dict[int, Font] = _THREAD_FONTS.__dict__.setdefault("fonts", {})
    if size not in cache:
        try:
            cache[size] = ImageFont.truetype("DejaVuSans.ttf", size, layout_engine=ImageFont.Layout.BASIC)
        except OSError:
            cache[size] = basic_layout(ImageFont.load_default(size=size))
    return cache[size]


def viridis(t: float) -> tuple[int, int, int]:
    """The colour of t in [0, 1] (clamped) on the viridis scale; grey where t is not finite."""
    if not math.isfinite(t):
        return NOT_FINITE
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    lo = int(np.floor(t))
    hi = min(lo + 1, len(_VIRIDIS) - 1)
    mix = _VIRIDIS[lo] * (1 - (t - lo)) + _VIRIDIS[hi] * (t - lo)
    r, g, b = (round(float(c)) for c in mix)
    return r, g, b


def _ink(rgb: tuple[int, int, int]) -> str:
    """Black on light cells, white on dark ones (relative luminance, sRGB weights)."""
    r, g, b = rgb
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else "white"


def _printable(text: str) -> str:
    # Captions are caller text: a newline or control character would break the layout.
    return "".join(c if c.isprintable() else " " for c in text)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float) -> str:
    """`text` cut with an ellipsis so it fits in `width` pixels."""
    text = _printable(text)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def auto_cell(n_rows: int, n_cols: int, panels: int = 1) -> int:
    """A cell size that keeps the whole grid (or a strip of `panels` grids) about TARGET_GRID wide."""
    n = max(n_rows, n_cols, 1)
    return int(min(MAX_CELL, max(MIN_CELL, TARGET_GRID // (n * panels))))


def _value_text(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _heatmap(
    matrix: np.ndarray,
    *,
    title: str,
    cell: int,
    row_labels: Sequence[str] | None,
    col_labels: Sequence[str] | None,
    value_range: tuple[float, float] | None,
    outline: Sequence[tuple[int, int]] | None,
    split: int | None,
    legend: Sequence[str],
    decimals: int,
    colour_bar: bool,
) -> Image.Image:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"a heatmap needs a non-empty 2-D matrix, got shape {matrix.shape}")
    n_rows, n_cols = matrix.shape
    rows = list(row_labels) if row_labels is not None else [f"I{i + 1}" for i in range(n_rows)]
    cols = list(col_labels) if col_labels is not None else [f"T{j + 1}" for j in range(n_cols)]
    if len(rows) != n_rows or len(cols) != n_cols:
        raise ValueError(f"{len(rows)} row and {len(cols)} column labels for a {n_rows}×{n_cols} matrix")
    label_size = max(12, min(18, cell // 3 + 4))
    label_font = font(label_size)
    value_font = font(max(10, min(17, cell // 3 + 1)))
    title_font, legend_font = font(18), font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = PAD + int(max(probe.textlength(r, font=label_font) for r in rows)) + 8
    top = PAD + 26 + label_size + 8
    grid_w, grid_h = n_cols * cell, n_rows * cell
    bar_space = BAR_WIDTH + 70 if colour_bar else 0
    widest = max([probe.textlength(title, font=title_font), *(probe.textlength(t, font=legend_font) for t in legend)])
    # Wide enough for the title and legend, up to a limit past which they are cut with an ellipsis.
    width = max(left + grid_w + PAD + bar_space, min(MAX_TEXT_WIDTH, PAD * 2 + int(widest)))
    legend_h = (len(legend) * 18 + PAD) if legend else 0
    height = top + grid_h + PAD + legend_h
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((PAD, PAD), _fit(draw, title, title_font, width - 2 * PAD), fill="black", font=title_font)

    finite = matrix[np.isfinite(matrix)]
    if value_range is not None:
        lo, hi = value_range
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    # Label every column when the labels fit side by side, else every second (third, ...) one.
    step = max(1, math.ceil((max(draw.textlength(c, font=label_font) for c in cols) + 4) / cell))
    for j, name in enumerate(cols):
        if j % step == 0:
            x = left + j * cell + cell / 2
            text = _fit(draw, name, label_font, cell * step + 6)
            draw.text((x, top - 6), text, fill="black", font=label_font, anchor="mb")
    show_values = cell >= MIN_CELL_WITH_VALUE
    for i, name in enumerate(rows):
        y0 = top + i * cell
        draw.text((left - 6, y0 + cell / 2), name, fill="black", font=label_font, anchor="rm")
        for j in range(n_cols):
            x0 = left + j * cell
            value = float(matrix[i, j])
            rgb = viridis((value - lo) / span)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=rgb)
            if show_values:
                text = _value_text(value, decimals)
                draw.text((x0 + cell / 2, y0 + cell / 2), text, fill=_ink(rgb), font=value_font, anchor="mm")
    if split is not None and split > 0:
        # White rules between blocks, e.g. images | captions in a joint matrix.
        if split < n_cols:
            draw.line([left + split * cell, top, left + split * cell, top + grid_h - 1], fill=SPLIT_INK, width=3)
        if split < n_rows:
            draw.line([left, top + split * cell, left + grid_w - 1, top + split * cell], fill=SPLIT_INK, width=3)
    marked = [(i, i) for i in range(min(n_rows, n_cols))] if outline is None else outline
    for i, j in marked:
        if 0 <= i < n_rows and 0 <= j < n_cols:
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=OUTLINE, width=max(2, cell // 20))
    if colour_bar:
        _draw_colour_bar(draw, left + grid_w + PAD + 6, top, grid_h, lo, hi, legend_font)
    for k, line in enumerate(legend):
        draw.text(
            (PAD, top + grid_h + PAD + k * 18),
            _fit(draw, line, legend_font, width - 2 * PAD),
            fill="black",
            font=legend_font,
        )
    return img


def _draw_colour_bar(
    draw: ImageDraw.ImageDraw, x: int, top: int, height: int, lo: float, hi: float, font: Font
) -> None:
    """A vertical viridis bar, maximum at the top, with its two end values printed beside it."""
    for k in range(height):
        draw.line([x, top + k, x + BAR_WIDTH - 1, top + k], fill=viridis(1 - k / max(height - 1, 1)))
    draw.rectangle([x - 1, top - 1, x + BAR_WIDTH, top + height], outline="black")
    draw.text((x + BAR_WIDTH + 4, top), f"{hi:.2f}", fill="black", font=font, anchor="lt")
    draw.text((x + BAR_WIDTH + 4, top + height), f"{lo:.2f}", fill="black", font=font, anchor="lb")


def to_png(img: Image.Image) -> bytes:
    """`img` as optimised PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def heatmap_png(
    matrix: np.ndarray,
    *,
    title: str = "cosine(image i, caption j)",
    cell: int | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    value_range: tuple[float, float] | None = None,
    outline: Sequence[tuple[int, int]] | None = None,
    split: int | None = None,
    legend: Sequence[str] = (),
    decimals: int = 2,
) -> bytes:
    """An N×M grid coloured by value, each cell printed, chosen cells outlined, with a colour bar.

    Rows default to images (I1..IN), columns to captions (T1..TM): the layout of CLIP's batch
    matrix. `outline` lists (row, column) cells to outline, the diagonal by default; `split` draws
    rules after that many rows and columns; `legend` lines go under the grid (e.g. "T1 = caption");
    `value_range` fixes the colour scale (e.g. (0, 1) for probabilities), else the data's min and max.
    `cell` is the cell size in pixels; by default it shrinks with the matrix to keep it on a screen.
    """
    rows, cols = np.shape(matrix)[:2] if np.ndim(matrix) == 2 else (0, 0)
    return to_png(
        _heatmap(
            matrix,
            title=title,
            cell=cell or auto_cell(rows, cols),
            row_labels=row_labels,
            col_labels=col_labels,
            value_range=value_range,
            outline=outline,
            split=split,
            legend=legend,
            decimals=decimals,
            colour_bar=True,
        )
    )


def heatmap_strip_png(
    matrices: Sequence[np.ndarray],
    titles: Sequence[str],
    *,
    cell: int | None = None,
    shared_scale: bool = True,
    value_range: tuple[float, float] | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    outline: Sequence[tuple[int, int]] | None = None,
    decimals: int = 2,
    title: str | None = None,
) -> bytes:
    """Several heatmaps side by side, one title each, for comparing them at a glance.

    With `shared_scale` every panel uses one colour scale (`value_range`, else the min and max over
    all panels) and only the last carries the colour bar; otherwise each panel has its own.
    """
    if not matrices or len(matrices) != len(titles):
        raise ValueError(f"a strip needs one title per matrix, got {len(matrices)} matrices and {len(titles)} titles")
    arrays = [np.asarray(m, dtype=np.float64) for m in matrices]
    if value_range is None and shared_scale:
        values = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays])
        value_range = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    rows = max(a.shape[0] for a in arrays)
    cols = max(a.shape[1] if a.ndim == 2 else 0 for a in arrays)
    size = cell or auto_cell(rows, cols, panels=len(arrays))
    panels = [
        _heatmap(
            a,
            title=t,
            cell=size,
            row_labels=row_labels,
            col_labels=col_labels,
            value_range=value_range,
            outline=outline,
            split=None,
            legend=(),
            decimals=decimals,
            colour_bar=not shared_scale or k == len(arrays) - 1,
        )
        for k, (a, t) in enumerate(zip(arrays, titles, strict=True))
    ]
    heading = PAD + 30 if title else 0  # room for the title's descenders above the panels
    strip = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels) + heading), "white")
    if title:
        draw = ImageDraw.Draw(strip)
        draw.text((PAD, PAD), _fit(draw, title, font(20), strip.width - 2 * PAD), fill="black", font=font(20))
    x = 0
    for panel in panels:
        strip.paste(panel, (x, heading))
        x += panel.width
    return to_png(strip)


def joint_heatmap_png(
    image_image: np.ndarray,
    image_text: np.ndarray,
    text_text: np.ndarray,
    *,
    title: str = "images then captions, all cosines: a modality gap shows as two bright blocks",
    legend: Sequence[str] = (),
) -> bytes:
    """The 2N×2N cosine matrix of N images (I1..IN) then their N captions (T1..TN), the two blocks
    ruled apart and each image-caption pair outlined: a modality gap shows as two bright blocks."""
    n = image_image.shape[0]
    joint = np.block([[image_image, image_text], [image_text.T, text_text]])
    names = [f"I{i + 1}" for i in range(n)] + [f"T{i + 1}" for i in range(n)]
    pairs = [(i, n + i) for i in range(n)] + [(n + i, i) for i in range(n)]
    return heatmap_png(joint, title=title, row_labels=names, col_labels=names, split=n, outline=pairs, legend=legend)


def contact_sheet_png(
    images: Sequence[Image.Image], labels: Sequence[str], *, tile: int = 128, title: str | None = None
) -> bytes:
    """A results sheet: up to five tiles a row, each picture centred in a tile×tile frame with its
    label (e.g. "#1  0.312") in large type on a band under it, in rank order, left to right."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels: give one label per image")
    count = len(images)
    cols = min(5, max(1, count))
    rows = max(1, (count + cols - 1) // cols)
    gap, band = 10, 30
    label_font, title_font = font(max(14, min(20, tile // 7))), font(20)
    heading = 34 if title else 0
    width = cols * (tile + gap) + gap
    sheet = Image.new("RGB", (width, heading + rows * (tile + band + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, gap), _fit(draw, title, title_font, width - 2 * gap), fill="black", font=title_font)
    for k, (picture, label) in enumerate(zip(images, labels, strict=True)):
        x = gap + (k % cols) * (tile + gap)
        y = heading + gap + (k // cols) * (tile + band + gap)
        # A grey frame of one size for every tile, so wide and tall pictures line up.
        draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=(232, 232, 232))
        thumb = picture.convert("RGB")
        thumb.thumbnail((tile, tile))
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        draw.rectangle([x, y + tile, x + tile - 1, y + tile + band - 1], fill=(30, 30, 30))
        text = _fit(draw, label, label_font, tile - 8)
        draw.text((x + tile / 2, y + tile + band / 2), text, fill="white", font=label_font, anchor="mm")
    return to_png(sheet)

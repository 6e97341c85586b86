"""The lesson pictures, read back as pixels: where the outline, the colour bar and the values are."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cliplens.server.render import (
    MIN_CELL_WITH_VALUE,
    NOT_FINITE,
    OUTLINE,
    auto_cell,
    contact_sheet_png,
    heatmap_png,
    heatmap_strip_png,
    joint_heatmap_png,
    viridis,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_MAGIC)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)


def _matrix(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.3, 0.9, (n, n))


def _outline_mask(pixels: np.ndarray) -> np.ndarray:
    return np.all(pixels == np.array(OUTLINE), axis=-1)


def _grid(pixels: np.ndarray, n: int) -> tuple[int, int, int]:
    """(left, top, cell) of the grid, from the outline around the diagonal cells."""
    ys, xs = np.nonzero(_outline_mask(pixels))
    left, top = int(xs.min()), int(ys.min())
    width, height = int(xs.max()) - left + 1, int(ys.max()) - top + 1
    assert width == height and width % n == 0, (width, height)
    return left, top, width // n


def _colour_bar_columns(pixels: np.ndarray) -> list[int]:
    """x of every pixel column that runs through many distinct colours, as a colour bar does
    (a column of cells holds one colour per cell plus anti-aliased digits)."""
    found = []
    for x in range(pixels.shape[1]):
        column = pixels[:, x]
        strong = column[(column.max(axis=1) - column.min(axis=1)) > 40]  # coloured, not grey ink
        if len({tuple(c) for c in strong}) > 120:
            found.append(x)
    return found


def _runs(xs: list[int]) -> int:
    return sum(1 for k, x in enumerate(xs) if k == 0 or x != xs[k - 1] + 1)


def test_diagonal_outline_lies_on_the_diagonal_cells_only() -> None:
    n = 5
    pixels = _decode(heatmap_png(_matrix(n), cell=50))
    left, top, cell = _grid(pixels, n)
    assert cell == 50
    ys, xs = np.nonzero(_outline_mask(pixels))
    rows, cols = (ys - top) // cell, (xs - left) // cell
    assert np.all(rows == cols)  # every red pixel is in a diagonal cell
    assert set(rows.tolist()) == set(range(n))  # and every diagonal cell has one
    assert not _outline_mask(_decode(heatmap_png(_matrix(n), cell=50, outline=[]))).any()


def test_cells_are_coloured_by_value_on_the_given_scale() -> None:
    matrix = np.array([[0.0, 1.0], [0.25, 0.5]])
    pixels = _decode(heatmap_png(matrix, cell=60, value_range=(0.0, 1.0), outline=[(1, 1)]))
    ys, xs = np.nonzero(_outline_mask(pixels))
    left, top, cell = int(xs.min()) - 60, int(ys.min()) - 60, 60  # the outline is around cell (1, 1)
    for (i, j), value in np.ndenumerate(matrix):
        corner = pixels[top + i * cell + 6, left + j * cell + 6]  # inside the cell, clear of the printed value
        assert tuple(corner) == viridis(value), (i, j)


def test_colour_bar_runs_from_max_at_top_to_min_at_bottom() -> None:
    pixels = _decode(heatmap_png(_matrix(4), cell=60))
    bars = _colour_bar_columns(pixels)
    assert bars and _runs(bars) == 1
    left, _, _ = _grid(pixels, 4)
    assert min(bars) > left + 4 * 60  # right of the grid
    column = pixels[:, bars[len(bars) // 2]]
    coloured = np.nonzero((column.max(axis=1) - column.min(axis=1)) > 40)[0]
    top, bottom = column[coloured[0] + 1], column[coloured[-1] - 1]
    assert np.abs(top - np.array(viridis(1.0))).max() <= 12
    assert np.abs(bottom - np.array(viridis(0.0))).max() <= 12


def test_sixteen_by_sixteen_stays_legible_with_values_in_the_cells() -> None:
    n = 16
    cell = auto_cell(n, n)
    assert cell >= MIN_CELL_WITH_VALUE  # big enough that every cell prints its value
    pixels = _decode(heatmap_png(_matrix(n)))
    left, top, found = _grid(pixels, n)
    assert found == cell
    assert pixels.shape[1] <= 1300 and pixels.shape[0] <= 1300  # fits a screen
    # The printed value: ink of another colour in the middle of each diagonal cell.
    for i in range(n):
        y, x = top + i * cell, left + i * cell
        middle = pixels[y + cell // 3 : y + 2 * cell // 3, x + 4 : x + cell - 4].reshape(-1, 3)
        background = pixels[y + 4, x + 4]
        assert (np.abs(middle - background).max(axis=1) > 80).sum() >= 10, i


def test_large_matrices_shrink_their_cells_and_drop_the_digits() -> None:
    small, big = auto_cell(4, 4), auto_cell(64, 64)
    assert small > big >= 10
    pixels = _decode(heatmap_png(_matrix(64)))
    assert pixels.shape[1] < 64 * small


def test_strip_shares_one_colour_bar_or_gives_each_panel_its_own() -> None:
    mats = [_matrix(4, seed) for seed in range(3)]
    shared = _decode(heatmap_strip_png(mats, ["a", "b", "c"], cell=40))
    separate = _decode(heatmap_strip_png(mats, ["a", "b", "c"], cell=40, shared_scale=False))
    assert _runs(_colour_bar_columns(shared)) == 1
    assert _runs(_colour_bar_columns(separate)) == 3
    one = _decode(heatmap_png(mats[0], cell=40))
    assert shared.shape[1] > 2 * one.shape[1]  # three panels side by side
    with pytest.raises(ValueError, match="one title per matrix"):
        heatmap_strip_png(mats, ["a"])


def test_joint_heatmap_is_two_n_square_and_outlines_the_pairs() -> None:
    n = 3
    ii, it, tt = _matrix(n, 1), _matrix(n, 2), _matrix(n, 3)
    pixels = _decode(joint_heatmap_png(ii, it, tt))
    ys, xs = np.nonzero(_outline_mask(pixels))
    cell = auto_cell(2 * n, 2 * n)
    left, top = int(xs.min()), int(ys.min())
    rows, cols = (ys - top) // cell, (xs - left) // cell
    pairs = {(i, n + i) for i in range(n)} | {(n + i, i) for i in range(n)}
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == pairs  # each image-caption pair, both ways


def test_contact_sheet_tiles_are_one_size_five_to_a_row_with_dark_label_bands() -> None:
    rng = np.random.default_rng(0)
    pictures = [Image.new("RGB", (int(w), int(h)), (200, 40, 40)) for w, h in rng.integers(20, 400, (7, 2))]
    labels = [f"#{k + 1}  {0.31 - k / 100:.3f}" for k in range(7)]
    tile = 128
    pixels = _decode(contact_sheet_png(pictures, labels, tile=tile))
    width = pixels.shape[1]
    assert width == 5 * (tile + 10) + 10  # five columns
    # Every tile is framed at one size: the red picture sits inside a tile×tile box whatever its shape.
    red = np.all(pixels == np.array([200, 40, 40]), axis=-1)
    for k in range(7):
        x, y = 10 + (k % 5) * (tile + 10), 10 + (k // 5) * (tile + 30 + 10)
        assert red[y : y + tile, x : x + tile].any(), k
        band = pixels[y + tile : y + tile + 30, x : x + tile].reshape(-1, 3)
        assert (band.max(axis=1) < 60).mean() > 0.5, k  # a dark band
        assert (band.min(axis=1) > 200).sum() > 30, k  # with light lettering on it
    with pytest.raises(ValueError, match="one label per image"):
        contact_sheet_png(pictures, labels[:3])


def test_contact_sheet_with_a_title_and_odd_images() -> None:
    pictures = [Image.new("L", (10, 300), 90), Image.new("RGBA", (300, 10), (0, 0, 255, 128))]
    png = contact_sheet_png(pictures, ["#1  0.900", "#2  a label far too long to fit under one tile"], title="hits")
    pixels = _decode(png)
    assert pixels.shape[1] == 2 * (128 + 10) + 10 and pixels.shape[0] > 128 + 30


def test_non_finite_cells_are_grey_not_a_crash() -> None:
    pixels = _decode(heatmap_png(np.array([[np.nan, 1.0], [np.inf, 0.2]]), cell=60))
    assert np.all(pixels == np.array(NOT_FINITE), axis=-1).sum() > 60 * 60  # two grey cells, minus their text
    assert _decode(heatmap_png(np.full((2, 2), np.nan))).size

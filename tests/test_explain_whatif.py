"""explain_similarity_matrix's temperature what-if and modality gap, through MCP, against torch and
numpy on the vectors the server's own encoder gives outside MCP."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliplens.server.config import Settings
from cliplens.server.encoder import ClipEncoder, load_encoder
from cliplens.server.images import load_pictures

from .conftest import connect, error_text, make_image, structured

CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square"]
NAMES = ["red.png", "green.jpg", "blue.png", "sub/yellow.png"]


def _paths(photos: Path) -> list[Path]:
    return [photos / name for name in NAMES]


def _vectors(encoder: ClipEncoder, photos: Path) -> tuple[np.ndarray, np.ndarray]:
    images = encoder.embed_images(load_pictures(_paths(photos), [photos])).astype(np.float64)
    return images, encoder.embed_texts(CAPTIONS).astype(np.float64)


async def _explain(settings: Settings, photos: Path, **extra: object) -> tuple[dict, list[bytes]]:
    async with connect(settings) as client:
        result = await client.call_tool(
            "explain_similarity_matrix",
            {"images": [str(p) for p in _paths(photos)], "captions": CAPTIONS, **extra},
        )
    out = structured(result)
    pngs = [base64.b64decode(block.data) for block in result.content if block.type == "image"]
    return out, pngs


async def test_what_if_numbers_equal_softmax_of_scaled_cosines(settings: Settings, photos: Path) -> None:
    scales = [0.01, 1.0, 37.5, 1000.0]
    out, pngs = await _explain(settings, photos, scales=scales)
    encoder = load_encoder(str(settings.model), "cpu", "fp32")
    img, txt = _vectors(encoder, photos)
    cos = torch.from_numpy(img @ txt.T)
    n, target = 4, torch.arange(4)
    assert [w["scale"] for w in out["temperature_what_if"]] == scales
    for w in out["temperature_what_if"]:
        s = w["scale"]
        logits = s * cos
        i2t, t2i = F.softmax(logits, dim=1), F.softmax(logits, dim=0)
        assert np.array(w["image_to_text"]) == pytest.approx(i2t.numpy(), abs=1e-4)
        assert np.array(w["text_to_image"]) == pytest.approx(t2i.numpy(), abs=1e-4)
        loss_rows, loss_cols = F.cross_entropy(logits, target), F.cross_entropy(logits.T, target)
        assert w["loss_image_to_text"] == pytest.approx(float(loss_rows), rel=1e-3, abs=1e-4)
        assert w["loss_text_to_image"] == pytest.approx(float(loss_cols), rel=1e-3, abs=1e-4)
        assert w["loss"] == pytest.approx(float(loss_rows + loss_cols) / 2, rel=1e-3, abs=1e-4)
        assert w["mean_diagonal_image_to_text"] == pytest.approx(float(i2t.diagonal().mean()), abs=1e-4)
        assert w["mean_diagonal_text_to_image"] == pytest.approx(float(t2i.diagonal().mean()), abs=1e-4)
        entropy = torch.special.entr(i2t).sum(dim=1).mean()
        assert w["mean_row_entropy"] == pytest.approx(float(entropy), abs=1e-4)
        assert w["max_entropy"] == pytest.approx(math.log(n))
        assert w["is_model_scale"] is False and w["sigmoid"] is None
        # The share of the loss carried by rows and columns whose top pick is wrong.
        rows_wrong, cols_wrong = cos.argmax(dim=1) != target, cos.argmax(dim=0) != target
        row_ce, col_ce = -i2t.diagonal().log(), -t2i.diagonal().log()
        share = (row_ce[rows_wrong].sum() + col_ce[cols_wrong].sum()) / (row_ce.sum() + col_ce.sum())
        assert w["mistake_share_of_loss"] == pytest.approx(float(share), abs=1e-3)
    tiny, huge = out["temperature_what_if"][0], out["temperature_what_if"][-1]
    # Near zero temperature's inverse everything is uniform and the loss is log N.
    assert tiny["loss"] == pytest.approx(math.log(n), abs=0.02)
    assert tiny["mean_row_entropy"] == pytest.approx(math.log(n), abs=1e-3)
    assert "nearly uniform" in tiny["reading"] and f"{math.log(n):.3f}" in tiny["reading"]
    assert huge["mean_row_entropy"] < 0.2 * math.log(n) and "one-hot" in huge["reading"]
    # Four pictures: the cosine heatmap, a strip of four panels, the 8×8 joint matrix.
    assert len(pngs) == 3
    sizes = [Image.open(io.BytesIO(png)).size for png in pngs]
    assert sizes[1][0] > 2 * sizes[0][0]


async def test_default_scales_include_the_models_own(settings: Settings, photos: Path) -> None:
    out, _ = await _explain(settings, photos)
    scales = [w["scale"] for w in out["temperature_what_if"]]
    assert scales == sorted(scales) and {1.0, 10.0, 100.0} <= set(scales)
    own = [w for w in out["temperature_what_if"] if w["is_model_scale"]]
    assert len(own) == 1 and own[0]["scale"] == pytest.approx(out["logit_scale"])
    # At the model's own scale the what-if is the lesson itself.
    assert own[0]["loss"] == pytest.approx(out["loss"], abs=1e-9)
    assert own[0]["image_to_text"] == out["image_to_text"]


async def test_modality_gap_equals_numpy_on_the_same_vectors(settings: Settings, photos: Path) -> None:
    out, _ = await _explain(settings, photos, scales=[1.0])
    gap = out["modality_gap"]
    img, txt = _vectors(load_encoder(str(settings.model), "cpu", "fp32"), photos)
    ii, tt, it = img @ img.T, txt @ txt.T, img @ txt.T
    off = ~np.eye(4, dtype=bool)
    assert np.array(gap["image_image"]) == pytest.approx(ii, abs=1e-4)
    assert np.array(gap["text_text"]) == pytest.approx(tt, abs=1e-4)
    assert gap["mean_image_image"] == pytest.approx(ii[off].mean(), abs=1e-4)
    assert gap["mean_text_text"] == pytest.approx(tt[off].mean(), abs=1e-4)
    assert gap["mean_matched"] == pytest.approx(np.diag(it).mean(), abs=1e-4)
    assert gap["mean_unmatched"] == pytest.approx(it[off].mean(), abs=1e-4)
    centroid = np.linalg.norm(img.mean(axis=0) - txt.mean(axis=0))
    assert gap["centroid_distance"] == pytest.approx(centroid, abs=1e-4)
    # The reading quotes this model's numbers and draws the conclusion they support.
    for key in ("mean_image_image", "mean_text_text", "mean_matched", "mean_unmatched", "centroid_distance"):
        assert f"{gap[key]:.3f}" in gap["reading"]
    within = min(gap["mean_image_image"], gap["mean_text_text"])
    if within - gap["mean_matched"] > 0.1:
        assert "shows a modality gap" in gap["reading"]
    else:
        assert "no modality gap" in gap["reading"] or "no clear modality gap" in gap["reading"]


@pytest.mark.parametrize(
    ("scales", "named"),
    [([5000.0], "5000"), ([0.0], "0.0"), ([-1.0], "-1.0"), ([2.0, 2.0], "repeated: [2.0]"), ([1.0] * 7, "at most 6")],
)
async def test_bad_scales_are_refused_naming_the_value(
    settings: Settings, photos: Path, scales: list[float], named: str
) -> None:
    async with connect(settings) as client:
        result = await client.call_tool(
            "explain_similarity_matrix",
            {"images": [str(p) for p in _paths(photos)], "captions": CAPTIONS, "scales": scales},
        )
    text = error_text(result)
    assert named in text and "scales" in text


async def test_siglip_what_if_keeps_the_bias_and_the_sigmoid_loss(tiny_siglip: Path, tmp_path: Path) -> None:
    photos = tmp_path / "allowed"
    for name, colour in zip(NAMES, ("red", "green", "blue", "yellow"), strict=True):
        make_image(photos / name, colour)
    settings = Settings(model=str(tiny_siglip), device="cpu", precision="fp32", db_dir=tmp_path / "db", allow=[photos])
    out, pngs = await _explain(settings, photos, scales=[0.5, 20.0])
    img, txt = _vectors(load_encoder(str(tiny_siglip), "cpu", "fp32"), photos)
    cos = torch.from_numpy(img @ txt.T)
    bias = out["logit_bias"]
    signs = 2 * torch.eye(4, dtype=torch.float64) - 1
    for w in out["temperature_what_if"]:
        logits = w["scale"] * cos + bias
        assert np.array(w["sigmoid"]) == pytest.approx(torch.sigmoid(logits).numpy(), abs=1e-4)
        assert w["loss"] == pytest.approx(float(-F.logsigmoid(signs * logits).sum() / 4), rel=1e-3, abs=1e-4)
        assert f"{bias:+.2f}" in w["reading"]
    assert len(pngs) == 3

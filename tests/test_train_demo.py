"""train_contrastive_demo through MCP: a fresh small CLIP learns N pairs, on the toy world or the user's photos."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mcp_types import CallToolResult
from PIL import Image
from PIL.ImageFile import ImageFile

from cliplens.server.config import Settings
from cliplens.server.minitrain import snapshot_steps

from .conftest import connect, error_text, make_image, structured

TOOL = "train_contrastive_demo"


def pngs(result: CallToolResult) -> list[ImageFile]:
    blocks = [b for b in result.content if b.type == "image"]
    assert all(b.mime_type == "image/png" for b in blocks)
    pictures = [Image.open(io.BytesIO(base64.b64decode(b.data))) for b in blocks]
    for picture in pictures:
        assert picture.format == "PNG"
        picture.load()  # a truncated file fails here
    return pictures


def diagonal_mean(snapshot: dict[str, Any]) -> float:
    return float(np.trace(np.array(snapshot["cosine"])) / len(snapshot["cosine"]))


async def test_default_toy_pairs_learn_their_diagonal(settings: Settings) -> None:
    rng_before = torch.random.get_rng_state()
    threads_before = torch.get_num_threads()
    reports: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total))

    async with connect(settings) as client:
        result = await client.call_tool(TOOL, {"max_seconds": 30}, progress_callback=on_progress)
    out = structured(result)
    assert out["source"] == "toy_world" and len(out["pairs"]) == 5
    assert out["pairs"][0] == {"index": 0, "image": "toy world: red bicycle", "caption": "a photo of a red bicycle."}
    assert (out["steps_requested"], out["steps_run"], out["stopped_by"]) == (60, 60, "steps")
    assert [s["step"] for s in out["snapshots"]] == [0, 12, 24, 36, 48, 60]
    curve = out["loss_curve"]
    assert len(curve) == 61 and curve[0] == out["snapshots"][0]["loss"] and curve[-1] == out["final_loss"]
    assert curve[-1] < 0.1 * curve[0]
    first, last = out["snapshots"][0], out["snapshots"][-1]
    assert diagonal_mean(last) > diagonal_mean(first) + 0.3
    assert last["diagonal_mean"] > last["off_diagonal_mean"] + 0.3
    assert out["final_diagonal_accuracy"] == 1.0 and last["diagonal_accuracy"] == 1.0
    assert first["diagonal_accuracy"] < 1.0  # untrained, the pairs are not yet told apart
    for snap in out["snapshots"]:
        cos, logits = np.array(snap["cosine"]), np.array(snap["logits"])
        assert cos.shape == (5, 5) and np.all(np.abs(cos) <= 1.0 + 1e-6)
        assert np.allclose(logits, snap["logit_scale"] * cos, atol=2e-3)
    assert out["chance_loss"] == pytest.approx(math.log(5), abs=1e-6)
    assert out["config"]["parameters"] > 10_000 and out["config"]["width"] == 64
    # The lesson is computed from this run's numbers.
    assert f"{first['loss']:.3f}" in out["lesson"] and "60 steps" in out["lesson"]
    strip, loss_plot = pngs(result)
    assert strip.width >= 600 and strip.height >= 400
    assert loss_plot.width >= 400 and loss_plot.height >= 250
    assert reports and reports[-1] == (60, 60)
    # The demo leaves the process's torch RNG and thread count as it found them.
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before


async def test_same_seed_same_numbers_and_another_seed_differs(settings: Settings) -> None:
    args = {"steps": 8, "max_seconds": 30}
    async with connect(settings) as client:
        one = structured(await client.call_tool(TOOL, {**args, "seed": 3}))
        two = structured(await client.call_tool(TOOL, {**args, "seed": 3}))
        other = structured(await client.call_tool(TOOL, {**args, "seed": 4}))
    assert one["loss_curve"] == two["loss_curve"]
    assert one["snapshots"] == two["snapshots"]
    assert one["loss_curve"] != other["loss_curve"]


async def test_user_pairs_from_the_allowed_folder(settings: Settings, photos: Path) -> None:
    images = [str(photos / name) for name in ("red.png", "green.jpg", "blue.png", "sub/yellow.png")]
    captions = ["a red square", "a green square", "a blue square", "a yellow square"]
    async with connect(settings) as client:
        result = await client.call_tool(TOOL, {"images": images, "captions": captions, "steps": 40, "max_seconds": 30})
    out = structured(result)
    assert out["source"] == "user"
    assert [p["image"] for p in out["pairs"]] == images and [p["caption"] for p in out["pairs"]] == captions
    assert out["steps_run"] == 40 and len(out["snapshots"][0]["cosine"]) == 4
    assert out["final_loss"] < 0.5 * out["loss_curve"][0]
    assert diagonal_mean(out["snapshots"][-1]) > diagonal_mean(out["snapshots"][0])
    assert len(pngs(result)) == 2


async def test_the_wall_clock_cap_stops_a_long_run(settings: Settings) -> None:
    async with connect(settings) as client:
        out = structured(await client.call_tool(TOOL, {"steps": 400, "max_seconds": 1}))
    assert out["stopped_by"] == "time" and out["steps_run"] < 400
    assert len(out["loss_curve"]) == out["steps_run"] + 1
    assert out["snapshots"][-1]["step"] == out["steps_run"]
    assert "cap" in out["lesson"]


async def test_repeated_captions_are_named_in_the_lesson(settings: Settings, photos: Path) -> None:
    images = [str(photos / "red.png"), str(photos / "blue.png"), str(photos / "green.jpg")]
    async with connect(settings) as client:
        out = structured(
            await client.call_tool(TOOL, {"images": images, "captions": ["a square", "a square", "green"], "steps": 3})
        )
    assert "Captions 1/2 are the same text" in out["lesson"]


@pytest.mark.parametrize(
    ("n_images", "n_captions", "extra", "expect"),
    [
        (1, 1, {}, "at least 2 items"),
        (9, 9, {}, "at most 8 items"),
        (3, 2, {}, "3 images and 2 captions"),
        (3, None, {}, "3 images and no captions"),
        (None, 2, {}, "2 captions and no images"),
        (None, None, {"steps": 0}, "greater than or equal to 1"),
        (None, None, {"steps": 401}, "less than or equal to 400"),
        (None, None, {"max_seconds": 31}, "less than or equal to 30"),
        (None, None, {"learning_rate": 1.0}, "less than or equal to 0.05"),
    ],
)
async def test_bad_input_is_refused_naming_the_value(
    settings: Settings, photos: Path, n_images: int | None, n_captions: int | None, extra: dict, expect: str
) -> None:
    args: dict[str, Any] = dict(extra)
    if n_images is not None:
        args["images"] = [str(photos / "red.png")] * n_images
    if n_captions is not None:
        args["captions"] = [f"caption {i}" for i in range(n_captions)]
    async with connect(settings) as client:
        assert expect in error_text(await client.call_tool(TOOL, args))


async def test_a_path_outside_the_allowed_folders_is_refused(settings: Settings, tmp_path: Path) -> None:
    outside = make_image(tmp_path / "elsewhere" / "x.png")
    inside = settings.allow[0] / "red.png"
    async with connect(settings) as client:
        text = error_text(await client.call_tool(TOOL, {"images": [str(inside), str(outside)], "captions": ["a", "b"]}))
    assert "allowed" in text


def test_snapshot_steps_spread_from_start_to_end() -> None:
    assert snapshot_steps(60, 6) == [0, 12, 24, 36, 48, 60]
    assert snapshot_steps(3, 6) == [0, 1, 2, 3]
    assert snapshot_steps(1, 6) == [0, 1]

"""probe_failure_modes through MCP, on the bundled toy CLIP: the toy world, a folder, bad input."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from cliplens.server.config import Settings
from cliplens.server.encoder import TOY_MODEL_DIR
from cliplens.server.probes import MODES, paint_word, verdict
from cliplens.server.toyworld import render_folder

from .conftest import connect, error_text, make_image, structured

EVAL = json.loads((TOY_MODEL_DIR / "eval.json").read_text(encoding="utf-8"))


@pytest.fixture
def toy_settings(tmp_path: Path) -> Settings:
    folder = tmp_path / "toys"
    render_folder(folder, count=6, seed=5)
    (tmp_path / "empty").mkdir()
    make_image(tmp_path / "outside" / "red.png")
    return Settings(model="toy", device="cpu", db_dir=tmp_path / "db", allow=[folder, tmp_path / "empty"])


def _pngs(result) -> list[Image.Image]:
    import io

    blocks = [b for b in result.content if b.type == "image"]
    return [Image.open(io.BytesIO(base64.b64decode(b.data))) for b in blocks]


async def test_the_toy_world_probes_show_clip_failing_where_it_should(toy_settings: Settings) -> None:
    async with connect(toy_settings) as client:
        result = await client.call_tool("probe_failure_modes", {"seed": 3, "samples": 24})
        subset = await client.call_tool(
            "probe_failure_modes", {"seed": 3, "samples": 24, "modes": ["spatial", "negation"]}
        )
    out = structured(result)
    probes = {p["mode"]: p for p in out["probes"]}
    assert list(probes) == list(MODES) and out["source"] == "toy" and out["model"] == "toy"
    assert len(_pngs(result)) == len(MODES)
    for p in probes.values():
        rows, cols = len(p["images"]), len(p["captions"])
        assert 2 <= rows <= 6 and 2 <= cols <= 6, p["mode"]
        assert len(p["cosine"]) == rows and all(len(r) == cols for r in p["cosine"])
        assert all(-1.0 <= v <= 1.0 for r in p["cosine"] for v in r)
        assert 0.0 <= p["value"] <= 1.0 and 0.0 < p["chance"] < 1.0 and p["measured"] >= 24
        assert p["reason"] and p["verdict"]
    # The bundled model names objects and colours well (eval.json), and fails on counting and negation.
    skill = min(EVAL["object_accuracy"], EVAL["colour_accuracy"])
    assert skill > 0.9
    assert probes["counting"]["value"] < skill - 0.15
    assert probes["counting"]["control"] > probes["counting"]["value"]  # size gives the count away
    assert probes["negation"]["value"] < probes["negation"]["chance"] < probes["negation"]["control"]
    assert probes["negation"]["verdict"].startswith("below chance")
    assert abs(probes["spatial"]["value"] - 0.5) < 0.15
    assert probes["text_in_images"]["value"] < probes["text_in_images"]["control"]
    assert probes["fine_grained"]["value"] < probes["fine_grained"]["control"]
    # Deterministic per seed, and each mode's numbers do not depend on which others ran.
    assert structured(subset)["probes"] == [probes["negation"], probes["spatial"]]


async def test_a_folder_is_probed_by_minimal_changes(toy_settings: Settings) -> None:
    folder = toy_settings.allow[0]
    async with connect(toy_settings) as client:
        result = await client.call_tool("probe_failure_modes", {"source": str(folder), "max_images": 4})
        chosen = await client.call_tool(
            "probe_failure_modes",
            {
                "source": str(folder),
                "modes": ["fine_grained", "text_in_images"],
                "subject": "car",
                "labels": ["red car", "orange car", "pink car"],
                "word": "tree",
            },
        )
    out = structured(result)
    assert out["source"] == str(folder)
    assert [p["mode"] for p in out["probes"]] == list(MODES)
    assert len(_pngs(result)) == len(MODES)
    files = {p.name for p in folder.glob("*.png")}
    for p in out["probes"]:
        assert p["measured"] == 4 and p["chance"] is None and math.isfinite(p["value"])
        assert len(p["cosine"]) == len(p["images"]) and all(len(r) == len(p["captions"]) for r in p["cosine"])
        assert all(name.split(" ")[0].rstrip(",") in files for name in p["images"])
    spatial = next(p for p in out["probes"] if p["mode"] == "spatial")
    assert any("mirrored" in name for name in spatial["images"])
    text, fine = structured(chosen)["probes"]  # always in the canonical order of MODES
    assert fine["captions"] == ["a photo of a red car.", "a photo of an orange car.", "a photo of a pink car."]
    assert all("(subject: car)" in name for name in fine["images"])
    assert text["captions"][1] == "a photo of a tree." and any('"tree" painted on' in n for n in text["images"])


async def test_bad_input_is_refused_naming_the_value(toy_settings: Settings, tmp_path: Path) -> None:
    async with connect(toy_settings) as client:
        unknown = await client.call_tool("probe_failure_modes", {"modes": ["counting", "colour_blindness"]})
        outside = await client.call_tool("probe_failure_modes", {"source": str(tmp_path / "outside")})
        empty = await client.call_tool("probe_failure_modes", {"source": str(tmp_path / "empty")})
        twice = await client.call_tool(
            "probe_failure_modes", {"source": str(tmp_path / "empty"), "labels": ["oak", "oak"]}
        )
    assert "colour_blindness" in error_text(unknown) and all(m in error_text(unknown) for m in MODES)
    assert str(tmp_path / "outside") in error_text(outside) and "outside the allowed" in error_text(outside)
    assert "empty" in error_text(empty) and "no image files" in error_text(empty)
    assert "oak" in error_text(twice) and "distinct" in error_text(twice)


def test_the_verdict_follows_the_numbers() -> None:
    assert verdict(0.0, 0.5, 40).startswith("below chance")
    assert verdict(0.52, 0.5, 80).startswith("near chance")
    assert verdict(0.98, 0.25, 160) == "works here"
    assert verdict(0.6, 0.333, 120).startswith("partly")


def test_a_painted_word_changes_only_a_label_band() -> None:
    picture = Image.new("RGB", (200, 120), (30, 160, 60))
    painted = paint_word(picture, "tree")
    assert painted.size == picture.size and painted.getpixel((2, 2)) == (30, 160, 60)
    assert painted.getpixel((100, 60)) != (30, 160, 60) and picture.getpixel((100, 60)) == (30, 160, 60)

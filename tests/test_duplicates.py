"""find_duplicates: the blockwise grouping against a brute-force reference, and the tool over MCP."""

from __future__ import annotations

import base64
import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplens.server import duplicates
from cliplens.server.config import Settings
from cliplens.server.duplicates import (
    brute_force_components,
    find_duplicate_groups,
    near_components,
    planted_vectors,
    union_pairs,
)
from cliplens.server.records import StoredImage
from cliplens.server.toyworld import render, single_scene
from cliplens.tools import find_duplicates as find_duplicates_tool

from .conftest import connect, error_text, structured


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blockwise_components_match_brute_force(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small blocks and edge chunks, so that pairs cross block borders and chunks split blocks.
    monkeypatch.setattr(duplicates, "BLOCK_ELEMENTS", 600 * 37)
    monkeypatch.setattr(duplicates, "EDGE_CHUNK_ELEMENTS", 4000)
    x = planted_vectors(600, 48, pairs=150, noise=0.3, seed=seed)
    for threshold in (0.97, 0.9, 0.6, 0.3):
        found = near_components(x, threshold)
        assert found == brute_force_components(x, threshold), threshold
        assert found, threshold  # planted copies sit well above every threshold tried
    # Chained copies form groups larger than two somewhere.
    assert max(len(g) for g in near_components(x, 0.9)) > 2


def test_union_pairs_joins_chains_into_one_set() -> None:
    parent = np.arange(8)
    union_pairs(parent, np.array([7, 5, 1]), np.array([5, 3, 7]))  # 1-7-5-3 in one chain
    assert parent.tolist() == [0, 1, 2, 1, 4, 1, 6, 1]


def _stored(path: str, digest: str, width: int, height: int, size: int) -> StoredImage:
    return StoredImage(path=path, size=size, mtime_ns=0, content_hash=digest, width=width, height=height)


def test_exact_copies_group_first_and_one_copy_stands_in_for_the_near_pass() -> None:
    rng = np.random.default_rng(0)
    base, other = rng.standard_normal(32), rng.standard_normal(32)
    near = base + 0.05 * rng.standard_normal(32)
    vectors = np.stack([base, base, near, other]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    images = [
        _stored("/p/a.png", "h1", 100, 100, 5000),
        _stored("/p/a_copy.png", "h1", 100, 100, 5000),
        _stored("/p/a_big.jpg", "h2", 200, 200, 3000),
        _stored("/p/b.png", "h3", 100, 100, 5000),
    ]
    groups = find_duplicate_groups(images, vectors, 0.95)
    assert [(g.kind, g.members) for g in groups] == [("exact", [0, 1]), ("near", [2, 0])]
    exact, close = groups
    assert exact.min_cosine == pytest.approx(1.0, abs=1e-6) and "identical bytes" in exact.keep_reason
    assert "most pixels" in close.keep_reason  # the bigger JPEG wins over the larger PNG file
    assert close.min_cosine == pytest.approx(float(vectors[0] @ vectors[2]), abs=1e-5)
    assert close.min_cosine < 0.999


def _toy_folder(root: Path) -> dict[str, Path]:
    rng = random.Random(3)
    scenes = {
        "car.png": single_scene(rng, "red", "car"),
        "boat.png": single_scene(rng, "blue", "boat"),
        "tree.png": single_scene(rng, "green", "tree"),
        "car_other.png": single_scene(rng, "red", "car"),  # another red car, placed elsewhere
    }
    root.mkdir(parents=True)
    files = {}
    for name, scene in scenes.items():
        files[name] = root / name
        render(scene, 256).save(files[name])
    files["copy/car.png"] = root / "copy" / "car.png"
    files["copy/car.png"].parent.mkdir()
    shutil.copyfile(files["car.png"], files["copy/car.png"])
    files["car_small.jpg"] = root / "car_small.jpg"
    Image.open(files["car.png"]).resize((160, 160), Image.Resampling.LANCZOS).save(files["car_small.jpg"], quality=70)
    return files


async def test_toy_model_finds_the_copy_and_the_reencoded_picture(tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    files = _toy_folder(folder)
    settings = Settings(model="toy", device="cpu", db_dir=tmp_path / "db", allow=[folder])
    async with connect(settings) as client:
        assert structured(await client.call_tool("index_folder", {"path": str(folder)}))["added"] == 6
        result = await client.call_tool("find_duplicates", {"folder": str(folder), "threshold": 0.99})
        tight = structured(result)
        loose = structured(
            await client.call_tool("find_duplicates", {"folder": str(folder), "threshold": 0.9, "thumbnails": False})
        )
    car, copy, small, other = (str(files[n]) for n in ("car.png", "copy/car.png", "car_small.jpg", "car_other.png"))
    assert tight["images_scanned"] == 6 and tight["threshold"] == 0.99
    assert [(g["kind"], [m["path"] for m in g["members"]]) for g in tight["groups"]] == [
        ("exact", [car, copy]),
        ("near", [car, small]),  # the 256 px original is kept over the 160 px JPEG
    ]
    exact, near = tight["groups"]
    assert (
        exact["keep_reason"].startswith("identical bytes")
        and exact["reclaimable_bytes"] == files["car.png"].stat().st_size
    )
    assert near["keep"] == car and "most pixels" in near["keep_reason"] and near["min_cosine"] >= 0.99
    assert near["members"][0]["identical_copies"] == 1 and near["members"][1]["identical_copies"] == 0
    assert tight["images_in_groups"] == 3 and tight["exact_groups"] == 1 and tight["near_groups"] == 1
    sheets = [block for block in result.content if block.type == "image"]
    assert len(sheets) == 2 and all(block.mime_type == "image/png" for block in sheets)
    assert Image.open(io.BytesIO(base64.b64decode(sheets[0].data))).width > 0
    # At 0.9 the other red car joins the near group; the boat and the tree never do.
    assert [(g["kind"], g["size"]) for g in loose["groups"]] == [("near", 3), ("exact", 2)]
    assert {m["path"] for m in loose["groups"][0]["members"]} == {car, small, other}
    assert loose["groups"][0]["min_cosine"] < 0.99


async def test_bad_inputs_name_the_value(settings: Settings, photos: Path, tmp_path: Path) -> None:
    async with connect(settings) as client:
        for bad, allowed in ((1.5, "less than or equal to 1"), (0.2, "greater than or equal to 0.5")):
            text = error_text(await client.call_tool("find_duplicates", {"folder": str(photos), "threshold": bad}))
            assert "threshold" in text and str(bad) in text and allowed in text, text
        text = error_text(await client.call_tool("find_duplicates", {"folder": str(tmp_path)}))
        assert str(tmp_path) in text and "outside the allowed folders" in text, text
        text = error_text(await client.call_tool("find_duplicates", {"folder": str(photos)}))
        assert str(photos) in text and "index_folder" in text, text
        text = error_text(await client.call_tool("find_duplicates", {"folder": str(photos), "max_groups": 0}))
        assert "max_groups" in text, text


async def test_exact_copies_with_tiny_model_and_max_groups(
    settings: Settings, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copyfile(photos / "red.png", photos / "sub" / "red_again.png")
    shutil.copyfile(photos / "blue.png", photos / "blue_again.png")
    async with connect(settings) as client:
        structured(await client.call_tool("index_folder", {"path": str(photos)}))
        out = structured(
            await client.call_tool(
                "find_duplicates", {"folder": str(photos), "threshold": 1.0, "max_groups": 1, "thumbnails": False}
            )
        )
        sub = structured(await client.call_tool("find_duplicates", {"folder": str(photos / "sub"), "threshold": 1.0}))
        monkeypatch.setattr(find_duplicates_tool, "MAX_IMAGES", 5)
        text = error_text(await client.call_tool("find_duplicates", {"folder": str(photos)}))
        assert "6 images are indexed" in text and "limit for one call is 5" in text, text
    assert out["groups_found"] == 2 and out["exact_groups"] == 2 and out["truncated"] and len(out["groups"]) == 1
    assert out["images_in_groups"] == 4 and "max_groups" in out["hint"]
    assert out["groups"][0]["kind"] == "exact" and out["groups"][0]["max_cosine"] == pytest.approx(1.0, abs=1e-5)
    # Under sub/ only the one copy and the yellow image are indexed: nothing to pair.
    assert sub["images_scanned"] == 2 and sub["groups"] == [] and "lower threshold" in sub["hint"]

"""search_images beyond plain text: query arithmetic, per-term contributions, the calibrated
cutoff, negation warnings, filters and the contact sheet.

Meaning comes from the bundled toy CLIP on a folder of toy scenes of known colour and kind
(two of each pair, so every image has one twin); plumbing uses the random tiny model.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import io
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cliplens.server.config import Settings
from cliplens.server.paths import PathPolicy
from cliplens.server.query import MAX_TERMS, format_query, negation_rewrite, parse_query
from cliplens.server.toyworld import render, single_scene

from .conftest import connect, error_text, make_image, structured

TOY_COLOURS = ("red", "blue", "green", "yellow")
TOY_KINDS = ("bicycle", "car", "house", "boat", "cup")


def _label(path: str) -> tuple[str, str]:
    colour, kind, _ = Path(path).name.split("_")
    return colour, kind


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """40 toy scenes (4 colours × 5 kinds × 2), indexed once with the toy model."""
    root = tmp_path_factory.mktemp("toy-search")
    world = root / "world"
    world.mkdir()
    rng = random.Random(7)
    for colour in TOY_COLOURS:
        for kind in TOY_KINDS:
            for j in range(2):
                render(single_scene(rng, colour, kind)).save(world / f"{colour}_{kind}_{j}.png")
    settings = Settings(model="toy", device="cpu", db_dir=root / "db", allow=[world])

    async def index() -> None:
        async with connect(settings) as client:
            assert structured(await client.call_tool("index_folder", {"path": str(world)}))["added"] == 40

    asyncio.run(index())
    return settings


async def _search(client: Any, **args: Any) -> dict[str, Any]:
    return structured(await client.call_tool("search_images", {"thumbnails": False, **args}))


def _assert_contributions_sum(out: dict[str, Any]) -> None:
    assert out["hits"]
    for hit in out["hits"]:
        assert len(hit["contributions"]) == len(out["terms"])
        assert sum(hit["contributions"]) == pytest.approx(hit["score"], abs=1e-5)


async def test_subtracting_a_colour_ranks_the_other_colours_first(toy: Settings) -> None:
    async with connect(toy) as client:
        out = await _search(client, query="a photo of a bicycle - red", top_k=6, cutoff="none")
        assert out["terms"] == [
            {"kind": "text", "text": "a photo of a bicycle", "weight": 1.0},
            {"kind": "text", "text": "red", "weight": -1.0},
        ]
        labels = [_label(h["path"]) for h in out["hits"]]
        assert all(kind == "bicycle" and colour != "red" for colour, kind in labels), labels
        _assert_contributions_sum(out)
        # Without the subtraction the red bicycles are among the best bicycles.
        plain = await _search(client, query="a red bicycle", top_k=2, cutoff="none")
        assert [_label(h["path"]) for h in plain["hits"]] == [("red", "bicycle")] * 2


async def test_an_image_query_finds_its_twin_and_leaves_itself_out(toy: Settings) -> None:
    async with connect(toy) as client:
        folder = toy.allow[0]
        out = await _search(client, query="red_car_0.png", top_k=3)
        assert out["terms"][0]["kind"] == "image" and out["terms"][0]["text"].endswith("red_car_0.png")
        assert out["null_used"] == "collection_sample" and out["confident"]
        assert [Path(h["path"]).name for h in out["hits"]] == ["red_car_1.png"], out["why"]
        assert [Path(p).name for p in out["excluded"]] == ["red_car_0.png"]
        _assert_contributions_sum(out)

        kept = await _search(client, query=str(folder / "red_car_0.png"), top_k=2, exclude_query_images=False)
        assert Path(kept["hits"][0]["path"]).name == "red_car_0.png" and kept["hits"][0]["score"] > 0.999
        assert kept["excluded"] == []

        # A file that is not indexed is embedded on the spot, to the same vector.
        (folder / "new").mkdir(exist_ok=True)
        shutil.copy(folder / "blue_boat_1.png", folder / "new" / "copy.png")
        fresh = await _search(client, query="new/copy.png", top_k=2, cutoff="none")
        assert Path(fresh["hits"][0]["path"]).name == "blue_boat_1.png" and fresh["hits"][0]["score"] > 0.99

        mixed = await _search(client, query="a photo of a car + 0.5 * red_car_0.png", top_k=5, cutoff="none")
        assert [t["kind"] for t in mixed["terms"]] == ["text", "image"] and mixed["terms"][1]["weight"] == 0.5
        assert all(_label(h["path"])[1] == "car" for h in mixed["hits"][:4])
        assert "red_car_0.png" not in {Path(h["path"]).name for h in mixed["hits"]}
        _assert_contributions_sum(mixed)


async def test_nonsense_is_no_confident_match_and_a_real_query_is(toy: Settings) -> None:
    async with connect(toy) as client:
        nonsense = await _search(client, query="zxqv blorft")
        assert nonsense["confident"] is False and nonsense["hits"] == []
        assert nonsense["why"].startswith("no confident match") and "generic prompts" in nonsense["why"]
        assert 'cutoff="none"' in nonsense["hint"] and nonsense["null_used"] == "generic_prompts"
        shown_anyway = await _search(client, query="zxqv blorft", cutoff="none", top_k=5)
        assert len(shown_anyway["hits"]) == 5 and not any(h["confident"] for h in shown_anyway["hits"])
        for hit in shown_anyway["hits"]:
            assert hit["margin"] == pytest.approx(hit["score"] - hit["null_score"], abs=2e-6)

        real = await _search(client, query="a photo of a red car", top_k=8)
        assert real["confident"] is True and "confident match" in real["why"]
        assert real["hits"] and {_label(h["path"]) for h in real["hits"]} == {("red", "car")}
        assert all(h["confident"] and h["margin"] > 0 for h in real["hits"])
        # min_score still floors what the cutoff keeps.
        floored = await _search(client, query="a photo of a red car", min_score=0.99)
        assert floored["hits"] == [] and "min_score" in floored["hint"]


async def test_negation_is_flagged_with_a_subtraction_and_rewritten_on_request(toy: Settings) -> None:
    async with connect(toy) as client:
        street = await _search(client, query="a street without cars", cutoff="none", top_k=1)
        assert street["suggested_query"] == "a street - cars" and not street["rewrote_negation"]
        assert "negation" in street["warnings"][0] and "'a street - cars'" in street["warnings"][0]
        assert [t["text"] for t in street["terms"]] == ["a street without cars"]

        query = "a photo of a bicycle that is not red"
        out = await _search(client, query=query, rewrite_negation=True, top_k=4, cutoff="none")
        assert out["rewrote_negation"] and out["original_query"] == query
        assert out["query"] == out["suggested_query"] == "a photo of a bicycle - red"
        assert [t["weight"] for t in out["terms"]] == [1.0, -1.0]
        assert all(_label(h["path"]) != ("red", "bicycle") for h in out["hits"])

        quoted = await _search(client, query='"a sign saying no smoking"', cutoff="none", top_k=1)
        assert quoted["warnings"] == [] and quoted["suggested_query"] is None


@pytest.mark.parametrize(
    ("query", "suggestion"),
    [
        ("a street without cars", "a street - cars"),
        ("a bicycle that is not red", "a bicycle - red"),
        ("a dog that doesn't have a collar", "a dog - collar"),
        ("a beach with no people or boats", "a beach - people - boats"),
        ("a non-red bicycle", "a bicycle - red"),
        ("0.5 * a cup except blue ones + a car", "0.5 * a cup - 0.5 * blue ones + a car"),
    ],
)
def test_negation_rewrites(query: str, suggestion: str, tmp_path: Path) -> None:
    terms = parse_query(query, PathPolicy([tmp_path]))
    rewritten = negation_rewrite(terms)
    assert rewritten is not None and format_query(rewritten) == suggestion


def test_the_grammar_keeps_hyphens_quotes_and_weights(tmp_path: Path) -> None:
    make_image(tmp_path / "beach.jpg", "yellow")
    policy = PathPolicy([tmp_path])
    terms = parse_query("a red t-shirt + 0.5*beach.jpg - x-ray - person", policy)
    assert [(t.kind, t.body, t.weight) for t in terms] == [
        ("text", "a red t-shirt", 1.0),
        ("image", "beach.jpg", 0.5),
        ("text", "x-ray", -1.0),
        ("text", "person", -1.0),
    ]
    assert terms[1].path == (tmp_path / "beach.jpg").resolve()
    quoted = parse_query('"beach.jpg" + "salt - pepper"', policy)
    assert [(t.kind, t.body) for t in quoted] == [("text", "beach.jpg"), ("text", "salt - pepper")]
    inches = parse_query('a 5" screen - a "tv', policy)  # unmatched quotes are just characters
    assert [(t.body, t.quoted) for t in inches] == [('a 5" screen', False), ('a "tv', False)]
    leading = parse_query("-person + a dog", policy)
    assert [(t.body, t.weight) for t in leading] == [("person", -1.0), ("a dog", 1.0)]
    assert format_query(terms) == "a red t-shirt + 0.5 * beach.jpg - x-ray - person"


async def test_bad_queries_name_the_term_and_what_is_allowed(settings: Settings, photos: Path, tmp_path: Path) -> None:
    outside = make_image(tmp_path / "secret" / "hidden.png", "blue")
    (photos / "link.png").symlink_to(outside)
    cases = {
        "a cat + 0 * a dog": ["weight 0", "0.01 to 10"],
        "a cat + 20 * a dog": ["weight 20", "0.01 to 10"],
        " + ".join(f"t{i}" for i in range(MAX_TERMS + 1)): [f"{MAX_TERMS + 1} terms", f"at most {MAX_TERMS}"],
        "- person": ["only subtracts"],
        "a cat - a cat": ["cancel out"],
        "nothing_here.jpg + a cat": ["'nothing_here.jpg'", "quote it"],
        "a cat + ": ["empty term"],
        "a cat + -2 * a dog": ["'-2 * a dog'", "plain number"],
        "link.png": ["leads outside the allowed folders"],
        str(outside): ["leads outside the allowed folders"],
    }
    async with connect(settings) as client:
        structured(await client.call_tool("index_folder", {"path": str(photos)}))
        for query, needles in cases.items():
            text = error_text(await client.call_tool("search_images", {"query": query}))
            for needle in needles:
                assert needle in text, (query, text)
            assert "secret" not in text or query == str(outside), (query, text)  # a link's target is not named
        bad = await client.call_tool(
            "search_images", {"query": "red", "filters": {"taken_after": "2024-05-02", "taken_before": "2023-01-01"}}
        )
        assert "2024-05-02" in error_text(bad) and "2023-01-01" in error_text(bad)


def _wall_clock(year: int, month: int, day: int) -> int:
    """The POSIX time whose local wall clock reads noon that day (how filters date an mtime)."""
    guess = calendar.timegm((year, month, day, 12, 0, 0))
    local = calendar.timegm(time.localtime(guess))
    return guess - (local - guess)


async def test_filters_by_capture_date_and_size(settings: Settings, photos: Path) -> None:
    dated = photos / "dated"
    old = make_image(dated / "old.png", "red")
    new = make_image(dated / "new.png", "green")
    big = make_image(dated / "big.png", "blue", size=(200, 150))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2019:05:04 10:00:00"
    Image.new("RGB", (48, 40), (200, 120, 30)).save(dated / "camera.jpg", exif=exif)
    with Image.open(dated / "camera.jpg") as img:  # the EXIF date survives the save
        assert img.getexif().get_ifd(0x8769)[0x9003] == "2019:05:04 10:00:00"
    os.utime(old, (_wall_clock(2015, 6, 1), _wall_clock(2015, 6, 1)))
    for path in (new, big, dated / "camera.jpg"):
        os.utime(path, (_wall_clock(2024, 1, 1), _wall_clock(2024, 1, 1)))
    base = {"query": "a photo", "folder": str(dated), "cutoff": "none", "top_k": 10}

    async def names(client: Any, filters: dict[str, Any]) -> tuple[set[str], dict[str, Any]]:
        out = structured(await client.call_tool("search_images", {**base, "filters": filters}))
        return {Path(h["path"]).name for h in out["hits"]}, out

    async with connect(settings) as client:
        structured(await client.call_tool("index_folder", {"path": str(dated)}))
        before, out = await names(client, {"taken_before": "2020-01-01"})
        assert before == {"old.png", "camera.jpg"} and out["filters"] == "taken on or before 2020-01-01"
        day, out = await names(client, {"taken_after": "2019-05-04", "taken_before": "2019-05-04"})
        assert day == {"camera.jpg"} and out["hits"][0]["taken"] == "2019-05-04 10:00:00"
        after, _ = await names(client, {"taken_after": "2023-12-31"})
        assert after == {"new.png", "big.png"}
        wide, _ = await names(client, {"min_width": 100, "min_height": 100})
        assert wide == {"big.png"}
        small_files = {p.name for p in dated.iterdir() if p.stat().st_size <= old.stat().st_size}
        by_size, out = await names(client, {"max_bytes": old.stat().st_size})
        assert by_size == small_files and "at most" in out["filters"]
        nothing, out = await names(client, {"taken_before": "1990-01-01"})
        assert nothing == set() and "filters" in out["hint"]


async def test_thumbnails_come_with_a_contact_sheet(settings: Settings, photos: Path) -> None:
    async with connect(settings) as client:
        structured(await client.call_tool("index_folder", {"path": str(photos)}))
        args = {"query": "a red square", "top_k": 3, "cutoff": "none"}
        result = await client.call_tool("search_images", args)
        hits = structured(result)["hits"]
        jpegs = [b for b in result.content if b.type == "image" and b.mime_type == "image/jpeg"]
        sheets = [b for b in result.content if b.type == "image" and b.mime_type == "image/png"]
        assert len(jpegs) == len(hits) == 3 and len(sheets) == 1
        sheet = Image.open(io.BytesIO(base64.b64decode(sheets[0].data)))
        assert sheet.format == "PNG" and sheet.width > 3 * 100
        plain = await client.call_tool("search_images", {**args, "contact_sheet": False})
        assert [b.mime_type for b in plain.content if b.type == "image"] == ["image/jpeg"] * 3
        none = await client.call_tool("search_images", {**args, "thumbnails": False})
        assert not [b for b in none.content if b.type == "image"]


async def test_an_image_query_in_a_tiny_folder_has_no_collection_to_judge_by(settings: Settings, photos: Path) -> None:
    async with connect(settings) as client:
        structured(await client.call_tool("index_folder", {"path": str(photos)}))
        out = await _search(client, query="red.png")
        assert out["hits"] == [] and not out["confident"] and "fewer than 8 images" in out["why"]
        shown_anyway = await _search(client, query="red.png", cutoff="none")
        assert len(shown_anyway["hits"]) == 3 and "red.png" not in {Path(h["path"]).name for h in shown_anyway["hits"]}
        assert all(h["null_score"] is None and h["margin"] is None for h in shown_anyway["hits"])

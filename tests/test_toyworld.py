"""The toy world: its size, determinism, held-out pairs, variety, visibility and folders."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplens.server.toyworld import (
    BACKGROUNDS,
    COLOURS,
    DRAWERS,
    HELD_OUT_PAIRS,
    KINDS,
    SIZE,
    SYNONYMS,
    Scene,
    render,
    render_folder,
    sample_scene,
    scene_record,
    scenes,
    single_scene,
)


def take(seed: int, count: int, **kwargs: object) -> list[Scene]:
    return list(itertools.islice(scenes(seed, **kwargs), count))  # pyright: ignore[reportArgumentType]


def mentions(caption: str, colour: str, kind: str) -> bool:
    """Whether a caption names this colour on this kind, by any of the kind's names.

    Covers "a red bike", "two red bicycles" and "a bike that is red".
    """
    for name in SYNONYMS[kind]:
        if re.search(rf"\b{colour} {name}", caption) or re.search(rf"\b{name} that is {colour}\b", caption):
            return True
    return False


def held_out_mentions(scene: Scene) -> list[tuple[str, str, str]]:
    return [(c, k, cap) for cap in scene.captions for c, k in HELD_OUT_PAIRS if mentions(cap, c, k)]


# --- the world's size --------------------------------------------------------------------


def test_the_world_is_big_enough() -> None:
    assert len(KINDS) >= 12
    assert len(COLOURS) >= 10
    assert len(BACKGROUNDS) >= 5
    assert len(set(KINDS)) == len(KINDS)


def test_every_kind_has_a_drawer_and_names() -> None:
    assert set(DRAWERS) == set(KINDS)
    for kind in KINDS:
        names = SYNONYMS[kind]
        assert names, kind
        assert names[0] == kind, "the first name is the canonical one"
        assert len(set(names)) == len(names)


def test_held_out_pairs_are_real_pairs_of_the_world() -> None:
    assert ("red", "bicycle") in HELD_OUT_PAIRS
    assert HELD_OUT_PAIRS[0] == ("red", "bicycle"), "the README's search uses the first"
    for colour, kind in HELD_OUT_PAIRS:
        assert colour in COLOURS and kind in KINDS


# --- determinism -------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_scenes_and_pixels() -> None:
    a, b = take(7, 60), take(7, 60)
    assert [scene_record(s, "x") for s in a] == [scene_record(s, "x") for s in b]
    for s, t in zip(a[:15], b[:15], strict=True):
        assert render(s).tobytes() == render(t).tobytes()


def test_another_seed_gives_other_scenes() -> None:
    a, b = take(7, 60), take(8, 60)
    assert [scene_record(s, "x") for s in a] != [scene_record(s, "x") for s in b]
    assert [render(s).tobytes() for s in a[:5]] != [render(s).tobytes() for s in b[:5]]


def test_sample_scene_depends_only_on_its_rng() -> None:
    one = [scene_record(sample_scene(random.Random(i)), "x") for i in range(20)]
    two = [scene_record(sample_scene(random.Random(i)), "x") for i in range(20)]
    assert one == two


# --- held-out pairs ----------------------------------------------------------------------


def test_the_mentions_check_catches_every_phrasing() -> None:
    # Guards the checks below against passing vacuously.
    assert mentions("a photo of a red bike.", "red", "bicycle")
    assert mentions("a red bicycle on a sky background", "red", "bicycle")
    assert mentions("two red bicycles", "red", "bicycle")
    assert mentions("a bike that is red", "red", "bicycle")
    assert mentions("a blue automobile", "blue", "car")
    assert not mentions("a red boat to the left of a blue bicycle", "red", "bicycle")
    assert not mentions("a bike that is redder", "red", "bicycle")


@pytest.mark.parametrize("mix", [(0.1, 0.05), (0.7, 0.1)], ids=["default-mix", "many-objects"])
def test_training_stream_never_shows_or_says_a_held_out_pair(mix: tuple[float, float]) -> None:
    for i, scene in enumerate(take(0, 5000, held_out=False, mix=mix)):
        for obj in scene.objects:
            assert (obj.color, obj.kind) not in HELD_OUT_PAIRS, (i, scene)
        assert not held_out_mentions(scene), (i, scene)


def test_the_full_world_does_show_held_out_pairs() -> None:
    world = take(0, 5000, held_out=True)
    shown = Counter((o.color, o.kind) for s in world for o in s.objects if (o.color, o.kind) in HELD_OUT_PAIRS)
    assert set(shown) == set(HELD_OUT_PAIRS), shown
    said = {(c, k) for s in world for c, k, _ in held_out_mentions(s)}
    assert said == set(HELD_OUT_PAIRS)
    # And a held-out scene is still labelled correctly.
    bike = single_scene(random.Random(0), "red", "bicycle")
    assert [(o.color, o.kind) for o in bike.objects] == [("red", "bicycle")]
    assert all(mentions(c, "red", "bicycle") for c in bike.captions)


# --- variety -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> list[Scene]:
    return take(1, 2000, held_out=False)


def test_every_kind_colour_and_background_appears(sample: list[Scene]) -> None:
    assert {o.kind for s in sample for o in s.objects} == set(KINDS)
    assert {o.color for s in sample for o in s.objects} == set(COLOURS)
    assert {s.background for s in sample} == set(BACKGROUNDS)


def test_scenes_vary_in_count_and_some_show_a_word(sample: list[Scene]) -> None:
    counts = Counter(len(s.objects) for s in sample)
    assert counts[1] > 0.5 * len(sample)
    assert counts[2] > 0 and counts[3] > 0
    words = [s for s in sample if s.word]
    assert words
    for s in words:
        assert not s.objects
        assert any(s.word in c for c in s.captions)
    assert all(s.captions for s in sample)


def test_multi_object_captions_count_and_place(sample: list[Scene]) -> None:
    multi = [s for s in sample if len(s.objects) > 1]
    counting = [s for s in multi if any(re.match(r"(a photo of )?(two|three) ", c) for c in s.captions)]
    spatial = [s for s in multi if any("to the left of" in c for c in s.captions)]
    assert counting and spatial
    for s in counting:
        # "two red cars" is said only of that many objects of one colour and kind.
        number = "two" if len(s.objects) == 2 else "three"
        assert all(c.removeprefix("a photo of ").startswith(number) for c in s.captions)
        assert len({(o.color, o.kind) for o in s.objects}) == 1
    for s in spatial:
        left, right = s.objects
        assert s.relation == "left of"
        assert left.position[0] < right.position[0]
        assert f"a {left.color} {left.kind} to the left of a {right.color} {right.kind}" in s.captions


def test_captions_use_synonyms(sample: list[Scene]) -> None:
    text = " ".join(c for s in sample for c in s.captions)
    assert re.search(r"\bbike\b", text)
    for kind, names in SYNONYMS.items():
        for name in names:
            assert re.search(rf"\b{name}", text), (kind, name)


# --- pixels ------------------------------------------------------------------------------


def _near(pixels: np.ndarray, rgb: tuple[int, int, int], within: float = 30.0) -> np.ndarray:
    return np.sqrt(((pixels - np.array(rgb)) ** 2).sum(-1)) < within


@pytest.mark.parametrize("kind", KINDS)
def test_single_objects_are_visible_on_their_background(kind: str) -> None:
    for i, colour in enumerate(COLOURS):
        scene = single_scene(random.Random(i), colour, kind)
        (obj,) = scene.objects
        pixels = np.asarray(render(scene)).astype(int)
        assert pixels.shape == (SIZE, SIZE, 3)
        ink = _near(pixels, COLOURS[colour])
        assert ink.mean() > 0.01, (colour, kind, float(ink.mean()))
        # Where the colour lies is where the object was put.
        ys, xs = np.nonzero(ink)
        centre = np.array([xs.mean(), ys.mean()]) / SIZE
        assert np.abs(centre - np.array(obj.position)).max() < obj.size, (colour, kind, centre, obj.position)
        common = Counter(map(tuple, pixels.reshape(-1, 3))).most_common(1)[0][0]
        assert common == BACKGROUNDS[scene.background], (colour, kind)


def test_words_are_drawn() -> None:
    for scene in [s for s in take(2, 400) if s.word][:5]:
        pixels = np.asarray(render(scene)).astype(int)
        background = _near(pixels, BACKGROUNDS[scene.background], within=1)
        assert 0.01 < 1 - background.mean() < 0.5, scene.word


# --- folders -----------------------------------------------------------------------------


def test_render_folder_writes_pngs_and_labels(tmp_path: Path) -> None:
    out = tmp_path / "scenes"
    labels = render_folder(out, count=20, seed=3)
    assert labels == out / "labels.jsonl"
    assert len(list(out.glob("*.png"))) == 20
    lines = labels.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 20
    records = [json.loads(line) for line in lines]
    assert len({r["file"] for r in records}) == 20
    for record in records:
        assert {"file", "objects", "word", "captions"} <= set(record)
        assert record["captions"] and all(isinstance(c, str) for c in record["captions"])
        for obj in record["objects"]:
            assert {"kind", "color", "position", "size"} <= set(obj)
            assert obj["kind"] in KINDS and obj["color"] in COLOURS
        with Image.open(out / record["file"]) as img:
            assert img.format == "PNG"
            assert img.size == (SIZE, SIZE)
    # The labels are the seed's scenes, in order.
    expected = [scene_record(s, f"scene_{i:05d}.png") for i, s in enumerate(take(3, 20))]
    assert records == json.loads(json.dumps(expected))

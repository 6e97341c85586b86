"""Meaning, with the bundled toy-world CLIP: search, zero-shot and the evaluation report.

Seeds here are never the training seed (0) nor the evaluation seed of the model card.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cliplens.server.config import Settings
from cliplens.server.encoder import TOY_MODEL_DIR, load_encoder
from cliplens.server.toyeval import evaluate
from cliplens.server.toyworld import COLOURS, HELD_OUT_PAIRS, render, render_folder, single_scene

from .conftest import connect, structured


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh test world with every pair possible, plus five red bicycles."""
    folder = tmp_path_factory.mktemp("world")
    render_folder(folder, count=150, seed=4242, held_out=True)
    rng = random.Random(4243)
    for i in range(5):
        render(single_scene(rng, "red", "bicycle")).save(folder / f"extra_red_bicycle_{i}.png")
    return folder


def _truth(world: Path) -> dict[str, set[tuple[str, str]]]:
    truth = {f"extra_red_bicycle_{i}.png": {("red", "bicycle")} for i in range(5)}
    for line in (world / "labels.jsonl").read_text().splitlines():
        record = json.loads(line)
        truth[record["file"]] = {(o["color"], o["kind"]) for o in record["objects"]}
    return truth


async def test_a_red_bicycle_search_finds_red_bicycles_it_never_saw(world: Path, tmp_path: Path) -> None:
    assert ("red", "bicycle") in HELD_OUT_PAIRS
    settings = Settings(model="toy", device="cpu", db_dir=tmp_path / "db", allow=[world])
    async with connect(settings) as client:
        indexed = structured(await client.call_tool("index_folder", {"path": str(world)}))
        assert indexed["added"] == 155 and indexed["model"] == "toy"
        out = structured(await client.call_tool("search_images", {"query": "a photo of a red bicycle", "top_k": 5}))
    truth = _truth(world)
    found = [("red", "bicycle") in truth[Path(h["path"]).name] for h in out["hits"]]
    assert found[0] and sum(found) >= 4, out["hits"]


async def test_zero_shot_picks_the_right_colour(tmp_path: Path) -> None:
    rng = random.Random(99)
    paths = []
    for colour in COLOURS:
        path = tmp_path / "allowed" / f"{colour}.png"
        path.parent.mkdir(exist_ok=True)
        render(single_scene(rng, colour, "car")).save(path)
        paths.append(path)
    settings = Settings(model="toy", device="cpu", db_dir=tmp_path / "db", allow=[tmp_path / "allowed"])
    async with connect(settings) as client:
        out = structured(
            await client.call_tool(
                "zero_shot_classify",
                {"images": [str(p) for p in paths], "labels": list(COLOURS), "templates": ["a photo of a {} car."]},
            )
        )
    right = [r["top_label"] == Path(r["image"]).stem for r in out["results"]]
    assert sum(right) >= 9, out["results"]


def test_the_evaluation_reports_accuracy_retrieval_and_probes() -> None:
    report = evaluate(load_encoder("toy", "cpu"), seed=777, singles=120, gallery=150, per_pair=10)
    assert report.object_accuracy >= 0.8 and report.colour_accuracy >= 0.85
    assert set(report.held_out_precision_at_10) == {f"{c} {k}" for c, k in HELD_OUT_PAIRS}
    assert report.mean_held_out_precision_at_10 >= 0.7
    assert set(report.probes) == {
        "counting_accuracy",
        "spatial_accuracy",
        "negation_error_rate",
        "typographic_attack_rate",
    }
    assert all(0.0 <= v <= 1.0 for v in report.probes.values())
    assert set(report.probe_notes) == set(report.probes)


def test_the_bundled_model_is_small_and_documented() -> None:
    total = sum(f.stat().st_size for f in TOY_MODEL_DIR.iterdir())
    assert total <= 25 * 1024 * 1024
    card = (TOY_MODEL_DIR / "README.md").read_text()
    assert "red bicycle" in card and "P@10" in card


def test_toyworld_render_command_writes_scenes_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cliplens.server.cli import main

    assert main(["toyworld", "render", str(tmp_path / "w"), "--count", "7", "--seed", "5", "--training"]) == 0
    lines = (tmp_path / "w" / "labels.jsonl").read_text().splitlines()
    assert len(lines) == 7 and len(list((tmp_path / "w").glob("*.png"))) == 7
    assert main(["toyworld", "render", str(tmp_path / "x"), "--count", "0"]) == 2
    assert "--count=0 is out of range" in capsys.readouterr().err


def test_train_toy_command_trains_evaluates_and_writes_a_model_card(tmp_path: Path) -> None:
    from cliplens.server.cli import main

    out = tmp_path / "model"
    assert main(["train-toy", "--out", str(out), "--samples", "256", "--pool", "128", "--eval-seed", "3"]) == 0
    card = (out / "README.md").read_text()
    assert "cliplens toy CLIP" in card and "held-out pairs, mean P@10" in card
    encoder = load_encoder(str(out), "cpu")
    assert encoder.info.dim == 128

"""compare_prompts through MCP, with the bundled toy CLIP on drawn scenes whose labels are known."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from mcp import Client

from cliplens.prompts import default_prompt_sets
from cliplens.server.config import Settings
from cliplens.server.encoder import ClipEncoder, load_encoder
from cliplens.server.images import load_pictures
from cliplens.server.toyworld import render, single_scene
from cliplens.tools.zero_shot_classify import class_embeddings

from .conftest import connect, error_text, structured

# Seen (colour, object) pairs only: this test is about prompts, not about composition.
SCENES = (
    ("red", "car"),
    ("green", "tree"),
    ("yellow", "boat"),
    ("blue", "house"),
    ("pink", "flower"),
    ("white", "star"),
)
LABELS = ["car", "tree", "boat", "house", "flower", "star", "kite"]
SETS = {
    "bare": ["{}"],
    "photo": ["a photo of a {}."],
    # The label glued to nonsense: the tokenizer no longer sees the word, so this set should lose.
    "glued": ["{}zzq"],
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[str]]:
    folder = tmp_path_factory.mktemp("toy-scenes")
    rng = random.Random(31337)
    paths, truth = [], []
    for colour, kind in SCENES:
        path = folder / f"{colour}_{kind}.png"
        render(single_scene(rng, colour, kind)).save(path)
        paths.append(path)
        truth.append(kind)
    return folder, paths, truth


@pytest.fixture(scope="module")
def toy() -> ClipEncoder:
    return load_encoder("toy", "cpu", "fp32")


def toy_settings(folder: Path, tmp_path: Path) -> Settings:
    return Settings(model="toy", device="cpu", precision="fp32", db_dir=tmp_path / "db", allow=[folder])


def recompute(toy: ClipEncoder, paths: list[Path], templates: list[str]) -> tuple[list[str], np.ndarray]:
    """Predicted labels and top-label margins, straight from the encoder."""
    images = toy.embed_images(load_pictures(paths)).astype(np.float64)
    cosines = images @ class_embeddings(toy, LABELS, templates).astype(np.float64).T
    ordered = np.sort(cosines, axis=1)
    return [LABELS[int(k)] for k in cosines.argmax(axis=1)], ordered[:, -1] - ordered[:, -2]


async def test_accuracy_margins_and_winner_match_a_recomputation(
    scenes: tuple[Path, list[Path], list[str]], toy: ClipEncoder, tmp_path: Path
) -> None:
    folder, paths, truth = scenes
    args = {"images": [str(p) for p in paths], "labels": LABELS, "template_sets": SETS, "truth": truth}
    async with connect(toy_settings(folder, tmp_path)) as client:
        out = structured(await client.call_tool("compare_prompts", args))
    assert [s["name"] for s in out["sets"]] == list(SETS) == out["table_columns"]
    accuracies = {}
    for report in out["sets"]:
        predicted, margins = recompute(toy, paths, SETS[report["name"]])
        assert [p["label"] for p in report["predictions"]] == predicted
        assert [p["margin"] for p in report["predictions"]] == pytest.approx(margins, abs=1e-4)
        right = [p == t for p, t in zip(predicted, truth, strict=True)]
        assert [p["correct"] for p in report["predictions"]] == right
        assert report["correct"] == sum(right)
        assert report["accuracy"] == pytest.approx(sum(right) / len(truth))
        assert report["mean_margin"] == pytest.approx(float(np.mean(margins)), abs=1e-4)
        assert all(0 < p["probability"] <= 1 for p in report["predictions"])
        accuracies[report["name"]] = (report["accuracy"], report["mean_margin"])
    # The toy model knows its objects; a word it cannot read must cost accuracy.
    assert accuracies["photo"][0] >= 5 / 6 and accuracies["glued"][0] <= 0.5
    best = max(accuracies.items(), key=lambda kv: kv[1])[0]
    assert out["winner_by"] == "accuracy" and out["winner"] == best == out["ranking"][0]
    assert sorted(out["ranking"]) == sorted(SETS) and repr(best) in out["verdict"]
    # The side-by-side table: one row per image, one cell per set, agreeing with the per-set reports.
    assert [Path(row["image"]).name for row in out["table"]] == [p.name for p in paths]
    for i, row in enumerate(out["table"]):
        assert row["truth"] == truth[i] and len(row["cells"]) == len(SETS)
        labels = [s["predictions"][i]["label"] for s in out["sets"]]
        assert all(cell.startswith(label + " p=") for cell, label in zip(row["cells"], labels, strict=True))
        assert row["agree"] == (len(set(labels)) == 1)
        assert all(
            cell.endswith("✓" if label == truth[i] else "✗") for cell, label in zip(row["cells"], labels, strict=True)
        )
    assert out["disagreements"] == sum(not row["agree"] for row in out["table"])
    assert out["model"] == "toy" and out["probability"] == "softmax"


async def test_without_truth_the_defaults_compete_on_mean_margin(
    scenes: tuple[Path, list[Path], list[str]], tmp_path: Path
) -> None:
    folder, paths, _ = scenes
    async with connect(toy_settings(folder, tmp_path)) as client:
        out = structured(
            await client.call_tool("compare_prompts", {"images": [str(p) for p in paths[:3]], "labels": LABELS[:4]})
        )
    defaults = default_prompt_sets()
    assert [s["name"] for s in out["sets"]] == list(defaults) == ["bare", "photo", "ensemble"]
    assert out["sets"][2]["templates"] == defaults["ensemble"] and len(defaults["ensemble"]) > 1
    assert out["truth"] is None and out["winner_by"] == "mean_margin"
    by_margin = sorted(out["sets"], key=lambda s: -s["mean_margin"])
    assert out["ranking"] == [s["name"] for s in by_margin] and out["winner"] == by_margin[0]["name"]
    for report in out["sets"]:
        assert report["accuracy"] is None and report["correct"] is None
        assert all(p["correct"] is None and p["margin"] >= 0 for p in report["predictions"])
    assert all(row["truth"] is None and "✓" not in "".join(row["cells"]) for row in out["table"])


async def _error(client: Client, **args: object) -> str:
    return error_text(await client.call_tool("compare_prompts", args))


async def test_bad_sets_and_truth_are_refused_naming_the_value(
    scenes: tuple[Path, list[Path], list[str]], tmp_path: Path
) -> None:
    folder, paths, _ = scenes
    images = [str(p) for p in paths[:2]]
    labels = ["car", "tree"]
    async with connect(toy_settings(folder, tmp_path)) as client:
        two = {"a": ["{}"], "b": ["a photo of a {}."]}
        assert "zebra" in await _error(client, images=images, labels=labels, truth=["car", "zebra"])
        assert "'car', 'tree'" in await _error(client, images=images, labels=labels, truth=["car", "zebra"])
        assert "1 labels for 2 images" in await _error(client, images=images, labels=labels, truth=["car"])
        bad_slot = await _error(client, images=images, labels=labels, template_sets={**two, "c": ["a {} and a {}"]})
        assert "a {} and a {}" in bad_slot and "exactly one" in bad_slot
        no_slot = await _error(client, images=images, labels=labels, template_sets={**two, "c": ["a photo"]})
        assert "a photo" in no_slot
        bad_name = await _error(client, images=images, labels=labels, template_sets={**two, "bad name!": ["{}"]})
        assert "bad name!" in bad_name
        assert "template_sets" in await _error(client, images=images, labels=labels, template_sets={"a": ["{}"]})
        repeated = await _error(client, images=images, labels=labels, template_sets={"a": ["{}", "{}"], "b": ["{}"]})
        assert "repeats" in repeated and "'a'" in repeated
        many = {f"s{i}": [f"t{j} {{}}" for j in range(30)] for i in range(4)}
        too_many = await _error(client, images=images, labels=[f"l{i}" for i in range(30)], template_sets=many)
        assert "3600 prompts" in too_many
        # Format-string braces in a template are text, never parsed.
        ok = structured(
            await client.call_tool(
                "compare_prompts",
                {"images": images, "labels": labels, "template_sets": {"x": ["{0.__class__} {}"], "y": ["{}"]}},
            )
        )
        assert ok["sets"][0]["templates"] == ["{0.__class__} {}"]

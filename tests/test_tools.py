"""The four tools through the MCP protocol (in-memory client), on a real model and real Chroma."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mcp import Client
from PIL import Image

from cliplens.server.app import build_server, open_engine
from cliplens.server.config import Settings
from cliplens.server.images import load_image
from cliplens.tools.zero_shot_classify import class_embeddings

from .conftest import connect, error_text, make_image, structured

TOOLS = {
    "index_folder",
    "index_status",
    "search_images",
    "find_duplicates",
    "zero_shot_classify",
    "compare_prompts",
    "explain_similarity_matrix",
    "train_contrastive_demo",
    "probe_failure_modes",
}


async def test_tools_are_listed_with_schemas_and_hints(settings: Settings) -> None:
    async with connect(settings) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.description and "\n" not in tool.description
            assert tool.output_schema and tool.output_schema["type"] == "object"
            assert tool.annotations is not None
        # index_status can cancel a job: not read-only either.
        for name in ("index_folder", "index_status"):
            assert tools[name].annotations.read_only_hint is False
        for name in TOOLS - {"index_folder", "index_status"}:
            assert tools[name].annotations.read_only_hint is True
        assert tools["search_images"].input_schema["properties"]["top_k"]["maximum"] == 100
        assert tools["zero_shot_classify"].input_schema["properties"]["labels"]["maxItems"] == 100


async def test_index_then_reindex_after_add_change_delete(settings: Settings, photos: Path) -> None:
    async with connect(settings) as client:
        progress: list[tuple[float, float | None]] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append((done, total))

        first = structured(await client.call_tool("index_folder", {"path": str(photos)}, progress_callback=on_progress))
        assert (first["scanned"], first["added"], first["updated"], first["unchanged"]) == (4, 4, 0, 0)
        assert first["skipped_count"] == 0 and first["store_total"] == 4
        assert progress and progress[-1] == (4, 4)

        again = structured(await client.call_tool("index_folder", {"path": str(photos)}))
        assert (again["added"], again["updated"], again["unchanged"], again["removed"]) == (0, 0, 4, 0)

        make_image(photos / "new.png", "green")
        make_image(photos / "red.png", "blue", size=(64, 64))  # same name, new content and size
        (photos / "sub" / "yellow.png").unlink()
        (photos / "broken.jpg").write_bytes(os.urandom(300))
        third = structured(await client.call_tool("index_folder", {"path": str(photos)}))
        assert (third["added"], third["updated"], third["unchanged"], third["removed"]) == (1, 1, 2, 1)
        assert third["skipped_count"] == 1
        assert third["skipped"][0]["path"].endswith("broken.jpg")
        assert third["skipped"][0]["reason"] in {"unsupported_format", "corrupt"}
        assert third["store_total"] == 4


async def test_non_recursive_index_leaves_subfolders(settings: Settings, photos: Path) -> None:
    async with connect(settings) as client:
        out = structured(await client.call_tool("index_folder", {"path": str(photos), "recursive": False}))
        assert out["scanned"] == 3


async def test_search_scores_are_cosines_best_first_with_thumbnails(photos: Path, settings: Settings) -> None:
    async with connect(settings) as client:
        structured(await client.call_tool("index_folder", {"path": str(photos)}))
        # cutoff "none": the random tiny model knows no meaning, so nothing is a confident match.
        result = await client.call_tool("search_images", {"query": "a red square", "top_k": 3, "cutoff": "none"})
        out = structured(result)
        hits = out["hits"]
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        thumbs = [b for b in result.content if b.type == "image" and b.mime_type == "image/jpeg"]
        assert len(thumbs) == 3
        for block in thumbs:
            assert block.mime_type == "image/jpeg"
            img = Image.open(io.BytesIO(base64.b64decode(block.data)))
            assert img.format == "JPEG" and max(img.size) <= 256
        # Independent check: the score is the cosine of the two towers' unit vectors.
        with open_engine(settings.model_copy(update={"db_dir": settings.db_dir.parent / "other"})) as app:
            q = app.encoder.embed_texts(["a red square"])[0]
            for hit in hits:
                v = app.encoder.embed_images([load_image(Path(hit["path"])).image])[0]
                assert hit["score"] == pytest.approx(float(q @ v), abs=1e-4)

        no_thumbs = await client.call_tool("search_images", {"query": "a red square", "thumbnails": False})
        assert not [b for b in no_thumbs.content if b.type == "image"]


async def test_search_folder_filter_and_min_score(settings: Settings, photos: Path) -> None:
    async with connect(settings) as client:
        structured(await client.call_tool("index_folder", {"path": str(photos)}))
        sub = structured(
            await client.call_tool(
                "search_images", {"query": "yellow", "folder": str(photos / "sub"), "cutoff": "none"}
            )
        )
        assert [Path(h["path"]).name for h in sub["hits"]] == ["yellow.png"]
        none = structured(
            await client.call_tool("search_images", {"query": "yellow", "min_score": 1.0, "cutoff": "none"})
        )
        assert none["hits"] == [] and "min_score" in none["hint"]


async def test_search_before_indexing_says_what_to_do(settings: Settings) -> None:
    async with connect(settings) as client:
        out = structured(await client.call_tool("search_images", {"query": "a red bicycle"}))
        assert out["hits"] == [] and "index_folder" in out["hint"]


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ({"query": "x", "top_k": 10**9}, "less than or equal to 100"),
        ({"query": "x", "top_k": 0}, "greater than or equal to 1"),
        ({"query": ""}, "at least 1 character"),
        ({"query": "   "}, "blank"),
        ({"query": "x" * 1001}, "at most 1000 characters"),
        ({"query": "x", "min_score": 2}, "less than or equal to 1"),
    ],
)
async def test_search_rejects_bad_input_clearly(settings: Settings, args: dict, expect: str) -> None:
    async with connect(settings) as client:
        assert expect in error_text(await client.call_tool("search_images", args))
        # The server is still fine afterwards.
        structured(await client.call_tool("search_images", {"query": "ok"}))


async def test_paths_outside_the_allowed_folders_are_refused(settings: Settings, photos: Path, tmp_path: Path) -> None:
    async with connect(settings) as client:
        outside = tmp_path / "photos2"
        make_image(outside / "x.png")
        for bad in (str(outside), str(photos / ".." / "photos2"), "/etc", "a\x00b"):
            text = error_text(await client.call_tool("index_folder", {"path": bad}))
            assert "allowed" in text or "NUL" in text or ".." in text, text
        text = error_text(
            await client.call_tool("zero_shot_classify", {"images": [str(outside / "x.png")], "labels": ["a", "b"]})
        )
        assert "allowed" in text


async def test_no_allowed_folder_says_how_to_allow_one(tiny_clip: Path, tmp_path: Path, photos: Path) -> None:
    settings = Settings(model=str(tiny_clip), device="cpu", db_dir=tmp_path / "db")
    async with Client(build_server(settings)) as client:
        text = error_text(await client.call_tool("index_folder", {"path": str(photos)}))
        assert "--allow" in text and "CLIPLENS_ALLOW" in text


async def test_zero_shot_matches_an_independent_computation(photos: Path, settings: Settings) -> None:
    async with connect(settings) as client:
        labels = ["red", "green", "blue"]
        images = [str(photos / "red.png"), str(photos / "blue.png")]
        out = structured(await client.call_tool("zero_shot_classify", {"images": images, "labels": labels}))
        assert out["probability"] == "softmax" and len(out["templates"]) >= 3
        with open_engine(settings.model_copy(update={"db_dir": settings.db_dir.parent / "other"})) as app:
            enc = app.encoder
            cls = class_embeddings(enc, labels, out["templates"])
            for res, path in zip(out["results"], images, strict=True):
                v = enc.embed_images([load_image(Path(path)).image])[0]
                cos = torch.tensor(cls @ v, dtype=torch.float64)
                probs = torch.softmax(cos * enc.logit_scale, dim=0)
                assert [res["cosines"][lb] for lb in labels] == pytest.approx(cos.tolist(), abs=1e-4)
                assert [res["probabilities"][lb] for lb in labels] == pytest.approx(probs.tolist(), abs=1e-4)
                assert res["top_label"] == labels[int(cos.argmax())]
                assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ({"labels": ["only-one"]}, "at least 2 items"),
        ({"labels": [str(i) for i in range(101)]}, "at most 100 items"),
        ({"labels": ["cat", "cat"]}, "distinct"),
        ({"labels": ["cat", "dog"], "templates": ["no slot here"]}, "exactly one '{}'"),
    ],
)
async def test_zero_shot_rejects_bad_labels(settings: Settings, photos: Path, args: dict, expect: str) -> None:
    async with connect(settings) as client:
        text = error_text(await client.call_tool("zero_shot_classify", {"images": [str(photos / "red.png")], **args}))
        assert expect in text


async def test_custom_templates_are_used(settings: Settings, photos: Path) -> None:
    async with connect(settings) as client:
        out = structured(
            await client.call_tool(
                "zero_shot_classify",
                {
                    "images": [str(photos / "red.png")],
                    "labels": ["cat", "dog"],
                    "templates": ["a drawing of a {}"],
                },
            )
        )
        assert out["templates"] == ["a drawing of a {}"]


async def test_unreadable_image_in_classify_names_the_file(settings: Settings, photos: Path) -> None:
    async with connect(settings) as client:
        bad = photos / "zero.png"
        bad.write_bytes(b"")
        text = error_text(await client.call_tool("zero_shot_classify", {"images": [str(bad)], "labels": ["a", "b"]}))
        assert "truncated" in text or "corrupt" in text
        assert str(bad) in text


async def test_explain_returns_heatmap_and_readings(settings: Settings, photos: Path) -> None:
    async with connect(settings) as client:
        images = [str(photos / n) for n in ("red.png", "green.jpg", "blue.png")]
        result = await client.call_tool(
            "explain_similarity_matrix",
            {"images": images, "captions": ["a red square", "a green square", "a blue square"]},
        )
        out = structured(result)
        assert out["n"] == 3 and len(out["readings"]) == 3
        pngs = [b for b in result.content if b.type == "image"]
        # The cosine heatmap, the temperature what-if strip and the joint (modality gap) matrix.
        assert len(pngs) == 3 and all(p.mime_type == "image/png" for p in pngs)
        assert all(Image.open(io.BytesIO(base64.b64decode(p.data))).format == "PNG" for p in pngs)
        for reading in out["readings"]:
            # Captions are user data: the prose refers to them by index only.
            assert "square" not in reading["text"]


@pytest.mark.parametrize(
    ("n_images", "n_captions", "expect"),
    [(3, 2, "3 images and 2 captions"), (1, 1, "at least 2 items"), (17, 17, "at most 16 items")],
)
async def test_explain_rejects_bad_sizes(
    settings: Settings, photos: Path, n_images: int, n_captions: int, expect: str
) -> None:
    async with connect(settings) as client:
        images = [str(photos / "red.png")] * n_images
        text = error_text(
            await client.call_tool(
                "explain_similarity_matrix",
                {"images": images, "captions": [f"c{i}" for i in range(n_captions)]},
            )
        )
        assert expect in text


def test_unit_vectors_are_float32(settings: Settings, photos: Path) -> None:
    with open_engine(settings) as app:
        v = app.encoder.embed_images([load_image(photos / "red.png").image])
        t = app.encoder.embed_texts(["a", "b c"])
    assert v.dtype == np.float32 and t.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)


async def test_a_link_to_a_file_elsewhere_in_the_allowed_folders_is_unchanged_on_reindex(
    settings: Settings, photos: Path
) -> None:
    (photos / "sub" / "alias.png").symlink_to(photos / "red.png")
    async with connect(settings) as client:
        first = structured(await client.call_tool("index_folder", {"path": str(photos / "sub")}))
        assert (first["scanned"], first["added"]) == (2, 2)
        again = structured(await client.call_tool("index_folder", {"path": str(photos / "sub")}))
        assert (again["added"], again["unchanged"], again["removed"]) == (0, 2, 0)
        everything = structured(await client.call_tool("index_folder", {"path": str(photos)}))
        # red.png is one file, reached twice: stored once, under its real path.
        assert (everything["scanned"], everything["added"], everything["unchanged"]) == (4, 2, 2)

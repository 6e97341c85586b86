"""The fast indexing path: our preprocessing against the model's processor, JPEG draft decoding
against the exact decode, precisions against fp32, reuse by content hash, one stat per
unchanged file, and search that filters folders without Chroma's regex scan."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cliplens.server.config import Settings
from cliplens.server.encoder import load_encoder, pick_precision
from cliplens.server.images import load_image
from cliplens.server.paths import PathPolicy
from cliplens.server.preprocess import FastPreprocessor
from cliplens.server.store import HNSW_EF_SEARCH, ImageStore, open_client
from cliplens.server.tinymodel import build_tiny_model
from cliplens.tools.index_folder import IndexFolderInput, index_folder

from .conftest import connect, make_image, structured

# Draft decoding tolerance, in grey levels of the model's input after resize and crop (mean
# absolute difference), and as the cosine between the two embeddings.
DRAFT_MAX_MEAN_GREY = 0.6
DRAFT_MIN_COSINE = 0.9999


def photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A JPEG with photo-like structure: smooth colour fields, hard-edged shapes, grain."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 255, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
    base = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(30):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(width // 40, width // 6))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    grain = np.asarray(base).astype(np.int16) + rng.integers(-12, 12, (height, width, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def toy_fp32():
    return load_encoder("toy", "cpu", "fp32")


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (101, 37), (64, 64), (999, 1000)])
def test_fast_preprocessing_matches_the_clip_processor(toy_fp32, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ref = toy_fp32.processor.image_processor(images=[img], return_tensors="np")["pixel_values"][0]
    ours = toy_fp32.preprocess(img)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-5


def test_fast_preprocessing_matches_siglip_and_siglip2_falls_back(tiny_siglip: Path, tmp_path: Path) -> None:
    siglip = load_encoder(str(tiny_siglip), "cpu", "fp32")
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (50, 90, 3), dtype=np.uint8))
    ref = siglip.processor.image_processor(images=[img], return_tensors="np")["pixel_values"][0]
    assert siglip.fast is not None and np.abs(siglip.preprocess(img) - ref).max() < 1e-5
    siglip2 = load_encoder(str(build_tiny_model(tmp_path / "s2", kind="siglip2")), "cpu", "fp32")
    # Variable-resolution patches: no fixed pixel tensor, so no fast path and no JPEG drafting.
    assert siglip2.fast is None and siglip2.draft_size is None
    assert siglip2.embed_images([img]).shape == (1, siglip2.info.dim)


@pytest.mark.parametrize("size", [(4000, 3000), (3000, 4000), (640, 480)])
def test_draft_decoding_stays_within_tolerance_of_the_exact_decode(
    toy_fp32, tmp_path: Path, size: tuple[int, int]
) -> None:
    path = photo(tmp_path / "p.jpg", *size)
    exact = load_image(path)
    drafted = load_image(path, draft=toy_fp32.draft_size)
    assert drafted.image.width < exact.image.width  # really decoded at a reduced scale
    assert (drafted.width, drafted.height) == (exact.width, exact.height) == size  # the file's own size
    a, b = toy_fp32.preprocess(exact.image), toy_fp32.preprocess(drafted.image)
    std = np.asarray(toy_fp32.processor.image_processor.image_std, np.float32).reshape(3, 1, 1)
    assert float((np.abs(a - b) * std * 255).mean()) < DRAFT_MAX_MEAN_GREY
    va, vb = toy_fp32.embed_pixels(np.stack([a, b]))
    assert float(va @ vb) > DRAFT_MIN_COSINE


def test_draft_keeps_the_rotated_size_of_an_exif_rotated_jpeg(tmp_path: Path) -> None:
    path = photo(tmp_path / "r.jpg", 800, 600)
    img = Image.open(path)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=90)
    drafted = load_image(tmp_path / "rot.jpg", draft=(64, 64))
    assert (drafted.width, drafted.height) == (600, 800)
    assert drafted.image.height > drafted.image.width


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precisions_stay_close_to_fp32(toy_fp32, precision: str, tmp_path: Path) -> None:
    fast = load_encoder("toy", "cpu", precision)
    assert fast.precision == precision
    assert fast.info.fingerprint == toy_fp32.info.fingerprint  # one collection, whatever the precision
    images = [load_image(photo(tmp_path / f"{i}.jpg", 200, 150, seed=i)).image for i in range(4)]
    texts = ["a red bicycle", "a blue car on grass", "two cats"]
    img_cos = np.sum(fast.embed_images(images) * toy_fp32.embed_images(images), axis=1)
    txt_cos = np.sum(fast.embed_texts(texts) * toy_fp32.embed_texts(texts), axis=1)
    floor = 0.99 if precision == "bf16" else 0.95
    assert img_cos.min() > floor and txt_cos.min() > floor


def test_precision_choices_and_errors() -> None:
    import torch

    cpu = torch.device("cpu")
    assert pick_precision("fp32", cpu) == "fp32"
    assert pick_precision("auto", torch.device("cuda")) == "fp16"
    assert pick_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(ValueError, match=r"'fp8' is not one of auto, fp32, bf16, fp16, int8"):
        pick_precision("fp8", cpu)
    with pytest.raises(ValueError, match="needs a GPU"):
        pick_precision("fp16", cpu)
    with pytest.raises(ValueError, match="fp8"):
        load_encoder("toy", "cpu", "fp8")


def test_repeated_queries_come_from_the_cache(toy_fp32) -> None:
    toy_fp32.clear_text_cache()
    first = toy_fp32.embed_texts(["a red bicycle", "a blue car", "a red bicycle"])
    assert np.array_equal(first[0], first[2])
    assert len(toy_fp32._text_cache) == 2
    again = toy_fp32.embed_texts(["a blue car"])
    assert np.array_equal(again[0], first[1])
    again[0][0] = 5.0  # callers get a copy: changing it leaves the cache alone
    assert np.array_equal(toy_fp32.embed_texts(["a blue car"])[0], first[1])
    with pytest.raises(ValueError):
        toy_fp32._text_cache["a blue car"][0] = 1.0  # and the cached vectors are read-only


async def test_moved_and_copied_files_reuse_their_embeddings(settings: Settings, photos: Path) -> None:
    async with connect(settings) as client:
        first = structured(await client.call_tool("index_folder", {"path": str(photos)}))
        assert first["reused"] == 0 and first["added"] == 4
        assert first["precision"] == "fp32" and "decode threads" in first["pipeline"]
        shutil.copy2(photos / "red.png", photos / "red-copy.png")
        (photos / "sub" / "yellow.png").rename(photos / "yellow-moved.png")
        second = structured(await client.call_tool("index_folder", {"path": str(photos)}))
        assert (second["added"], second["reused"], second["removed"]) == (2, 2, 1)
        hits = structured(
            await client.call_tool("search_images", {"query": "red", "top_k": 5, "thumbnails": False, "cutoff": "none"})
        )
        by_path = {Path(h["path"]).name: h["score"] for h in hits["hits"]}
        assert by_path["red.png"] == pytest.approx(by_path["red-copy.png"], abs=1e-6)


def test_an_unchanged_folder_costs_one_stat_per_file(
    settings: Settings, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(40):
        make_image(photos / "many" / f"{i:03d}.png", (i * 6, 100, 200 - i * 4))
    encoder = load_encoder(settings.model, "cpu", "fp32")
    store = ImageStore(open_client(settings.db_dir, None), encoder.info, location="test")
    policy = PathPolicy([photos])
    first = index_folder(encoder, store, policy, IndexFolderInput(path=str(photos)))
    assert first.added == 44
    calls: list[str] = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        calls.append(str(path))
        return real_stat(path, *args, **kwargs)

    # The walk's DirEntry.stat is the one stat per file; nothing else may stat the images.
    monkeypatch.setattr(os, "stat", counting_stat)
    again = index_folder(encoder, store, policy, IndexFolderInput(path=str(photos)))
    monkeypatch.undo()
    assert (again.unchanged, again.added, again.updated) == (44, 0, 0)
    assert not [c for c in calls if c.endswith(".png")]


def test_folder_search_falls_back_when_other_folders_crowd_the_nearest(tmp_path: Path, tiny_clip: Path) -> None:
    big, small = tmp_path / "big", tmp_path / "small"
    for i in range(60):
        make_image(big / f"red{i:02d}.png", (220, 30 + i, 30))
    make_image(small / "blue.png", "blue")
    make_image(small / "green.png", "green")
    encoder = load_encoder(str(tiny_clip), "cpu", "fp32")
    store = ImageStore(open_client(tmp_path / "db", None), encoder.info, location="test")
    policy = PathPolicy([tmp_path])
    index_folder(encoder, store, policy, IndexFolderInput(path=str(tmp_path)))
    red = encoder.embed_images([Image.new("RGB", (48, 40), (220, 30, 30))])[0]
    only_small = store.query(red, 2, [small])
    assert sorted(Path(s.path).name for s, _ in only_small) == ["blue.png", "green.png"]
    everywhere = store.query(red, 5, [tmp_path])
    assert len(everywhere) == 5 and all(Path(s.path).parent == big for s, _ in everywhere)
    scores = [c for _, c in everywhere]
    assert scores == sorted(scores, reverse=True)


def test_collections_search_with_a_wide_beam_even_when_made_before(tmp_path: Path, tiny_clip: Path) -> None:
    encoder = load_encoder(str(tiny_clip), "cpu", "fp32")
    client = open_client(tmp_path / "db", None)
    from cliplens.server.store import collection_name

    # A collection as an earlier cliplens made it: Chroma's default ef_search of 100.
    client.create_collection(
        collection_name(encoder.info),
        metadata={"model": encoder.info.model_id, "dim": encoder.info.dim, "fingerprint": encoder.info.fingerprint},
        configuration={"hnsw": {"space": "cosine"}},
        embedding_function=None,
    )
    store = ImageStore(client, encoder.info, location="test")
    hnsw = store.require_writable().configuration["hnsw"]
    assert hnsw["ef_search"] == HNSW_EF_SEARCH and hnsw["space"] == "cosine"


def test_memory_stays_bounded_however_many_images(tmp_path: Path, toy_fp32) -> None:
    """Peak Python-visible memory (NumPy pixels among it) does not grow with the folder."""
    import tracemalloc

    from cliplens.server.pipeline import IndexPipeline

    def peak_for(count: int) -> int:
        folder = tmp_path / f"n{count}"
        paths = [photo(folder / f"{i:04d}.jpg", 96, 80, seed=i) for i in range(count)]
        store = ImageStore(open_client(tmp_path / f"db{count}", None), toy_fp32.info, location="test")
        pipeline = IndexPipeline(toy_fp32, store, batch_size=8, workers=2)
        tracemalloc.start()
        try:
            pipeline.run(paths)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak_for(48), peak_for(480)
    # 48 pixel tensors of 3x64x64 float32 are 2.4 MB; 480 would be 24 MB if they were all kept.
    assert large < small * 1.5 + 1_000_000, (small, large)
    assert small > 8 * 3 * 64 * 64 * 4  # the tracing sees the pixel batches at all


def test_cpu_gate_never_lets_decoding_run_during_the_model() -> None:
    import threading
    import time

    from cliplens.server.pipeline import CpuGate

    gate = CpuGate(enabled=True)
    log: list[tuple[str, float, float]] = []

    def decode() -> None:
        for _ in range(20):
            with gate.decoding():
                start = time.perf_counter()
                time.sleep(0.002)
                log.append(("decode", start, time.perf_counter()))

    def model() -> None:
        for _ in range(5):
            with gate.model():
                start = time.perf_counter()
                time.sleep(0.01)
                log.append(("model", start, time.perf_counter()))

    threads = [threading.Thread(target=decode) for _ in range(3)] + [threading.Thread(target=model)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    models = [(s, e) for kind, s, e in log if kind == "model"]
    decodes = [(s, e) for kind, s, e in log if kind == "decode"]
    assert len(models) == 5 and len(decodes) == 60
    assert not [d for d in decodes for m in models if d[0] < m[1] and m[0] < d[1]], "decode overlapped the model"
    # Decoders do run together between forward passes.
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(decodes) for b in decodes[i + 1 :])
    # Open (GPU): no waiting at all.
    open_gate = CpuGate(enabled=False)
    with open_gate.model(), open_gate.decoding():
        pass


def test_a_sliver_is_cropped_before_it_is_resized(toy_fp32) -> None:
    # 1x20000 resized by its short side to 224 would be 224 x 4,480,000 pixels (3 GB) to keep
    # a 224x224 centre: only the window that lands in the crop may be resampled.
    import tracemalloc

    from transformers import CLIPImageProcessor

    fast = FastPreprocessor.for_processor(CLIPImageProcessor())
    assert fast is not None and fast.crop == (224, 224)
    rng = np.random.default_rng(3)
    for w, h in ((1, 20000), (20000, 1), (3, 60000)):
        sliver = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        tracemalloc.start()
        out = fast(sliver)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out.shape == (3, 224, 224) and np.isfinite(out).all()
        assert peak < 16 * 1024 * 1024, peak
    # Below the extreme-aspect threshold the exact path (equal to the processor) still runs.
    panorama = Image.fromarray(rng.integers(0, 255, (100, 1000, 3), dtype=np.uint8))
    ref = CLIPImageProcessor()(images=[panorama], return_tensors="np")["pixel_values"][0]
    assert np.abs(fast(panorama) - ref).max() < 1e-5

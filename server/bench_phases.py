"""The phases of `cliplens bench`, each meant to run in a process of its own.

A phase loads the model itself, warms it up, times one thing with time.perf_counter and
returns plain numbers. Run alone in a fresh process, its peak RSS (ru_maxrss) is its own:
the 12-megapixel decodes of one phase do not inflate the figure of the next.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .encoder import ClipEncoder
    from .store import ImageStore

NAIVE_BATCH = 32
TOP_K = 10
WARMUP_QUERIES = 3


class PhaseError(RuntimeError):
    """A phase could not measure what it should (the setup went wrong, not the speed)."""


@dataclass(frozen=True)
class PhaseParams:
    model: str
    device: str
    precision: str
    run_dir: str  # scratch space of this bench run: stores, fake folders
    folder: str = ""  # the images the phase works on
    png_folder: str = ""
    vectors: int = 0
    queries: int = 0
    seed: int = 0


def peak_rss_mib() -> float | None:
    """This process's RSS high-water mark, or None where the platform has no getrusage."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def runtime_info(encoder: ClipEncoder) -> dict[str, Any]:
    import torch

    return {"device": str(encoder.device), "precision": encoder.precision, "torch_threads": torch.get_num_threads()}


def _gpu_peak_mib(encoder: ClipEncoder) -> float | None:
    import torch

    if encoder.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(encoder.device) / 2**20


def _images(folder: str, suffix: str) -> list[Path]:
    files = sorted(Path(folder).glob(f"*{suffix}"))
    if not files:
        raise PhaseError(f"no {suffix} files in {folder}")
    return files


def _read_through(files: Sequence[Path]) -> None:
    # Both pipelines compared should find the files in the page cache: otherwise the
    # first one would also pay for the disk and the second would not.
    for path in files:
        path.read_bytes()


def _load(params: PhaseParams, precision: str | None = None) -> ClipEncoder:
    from .encoder import load_encoder

    return load_encoder(params.model, params.device, precision or params.precision)


def _fresh_store(encoder: ClipEncoder, params: PhaseParams, name: str) -> ImageStore:
    from .store import ImageStore, open_client

    db = Path(params.run_dir) / f"db-{name}"
    if db.exists():
        raise PhaseError(f"store {db} already exists; each phase needs a fresh one")
    return ImageStore(open_client(db, None), encoder.info, location=str(db), lock=None)


def _pixel_shape(encoder: ClipEncoder) -> tuple[int, ...]:
    return tuple(encoder.preprocess(Image.new("RGB", (640, 480), (90, 120, 150))).shape)


def _warm_encoder(encoder: ClipEncoder, batch: int) -> None:
    # The first calls pay for allocation, kernel selection and (with a GPU) the context.
    pixels = np.zeros((batch, *_pixel_shape(encoder)), np.float32)
    for _ in range(2):
        encoder.embed_pixels(pixels)
    encoder.embed_texts(["warming up the text tower"])


def _index(encoder: ClipEncoder, store: ImageStore, folder: str) -> tuple[Any, float]:
    from ..tools.index_folder import IndexFolderInput, index_folder
    from .paths import PathPolicy

    policy = PathPolicy([folder])
    request = IndexFolderInput(path=str(Path(folder).resolve()), recursive=True, prune=True)
    started = time.perf_counter()
    result = index_folder(encoder, store, policy, request)
    return result, time.perf_counter() - started


def _index_all(encoder: ClipEncoder, params: PhaseParams, folder: str, suffix: str, name: str) -> dict[str, Any]:
    files = _images(folder, suffix)
    _read_through(files)
    result, seconds = _index(encoder, _fresh_store(encoder, params, name), folder)
    # Reused embeddings (same bytes under another path) would skip the model: none may occur.
    if result.added != len(files) or result.skipped_count or result.reused:
        raise PhaseError(
            f"indexing {folder} embedded {result.added - result.reused} of {len(files)} images "
            f"({result.skipped_count} skipped: {[s.reason for s in result.skipped][:5]})"
        )
    return {"images": len(files), "seconds": seconds, "img_s": len(files) / seconds}


def naive_big(params: PhaseParams) -> dict[str, Any]:
    """What a first attempt looks like: PIL opens each file, the model's own processor
    resizes the full image, an fp32 model embeds batches of 32, and Chroma adds them."""
    import torch

    from .store import open_client

    encoder = _load(params, "fp32")
    model, processor, device = encoder.model, encoder.processor, encoder.device
    files = _images(params.folder, ".jpg")
    _read_through(files)

    def embed(images: list[Image.Image]) -> np.ndarray:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        with torch.inference_mode():
            out = model.get_image_features(pixel_values=pixels)
        feats = (out.pooler_output if hasattr(out, "pooler_output") else out).float()
        return (feats / feats.norm(dim=-1, keepdim=True)).cpu().numpy()

    embed([Image.new("RGB", (640, 480))] * min(NAIVE_BATCH, len(files)))  # warm-up, untimed
    client = open_client(Path(params.run_dir) / "db-naive", None)
    collection = client.create_collection(
        "naive-bench", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
    )
    started = time.perf_counter()
    for first in range(0, len(files), NAIVE_BATCH):
        batch = files[first : first + NAIVE_BATCH]
        vectors = embed([Image.open(path).convert("RGB") for path in batch])
        collection.add(ids=[str(p) for p in batch], embeddings=vectors, documents=[str(p) for p in batch])
    seconds = time.perf_counter() - started
    if collection.count() != len(files):
        raise PhaseError(f"the naive pipeline stored {collection.count()} of {len(files)} images")
    return {"images": len(files), "seconds": seconds, "img_s": len(files) / seconds, **_gpu(encoder)}


def cliplens_big(params: PhaseParams) -> dict[str, Any]:
    encoder = _load(params)
    _warm_encoder(encoder, encoder.batch_size)
    return {**_index_all(encoder, params, params.folder, ".jpg", "big"), **runtime_info(encoder), **_gpu(encoder)}


def _encoder_rate(encoder: ClipEncoder, pixels: np.ndarray, batch: int) -> tuple[float, float]:
    started = time.perf_counter()
    for first in range(0, len(pixels), batch):
        encoder.embed_pixels(pixels[first : first + batch])
    seconds = time.perf_counter() - started
    return len(pixels), seconds


def small(params: PhaseParams) -> dict[str, Any]:
    """cliplens on 640×480 files against its own encoder alone, on the same images."""
    encoder = _load(params)
    batch = encoder.batch_size  # what index_folder's pipeline uses when not told otherwise
    jpegs = _images(params.folder, ".jpg")
    # Made before any timing: the encoder-only figure is the model's speed and nothing else.
    pixels = np.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in jpegs]).astype(np.float32)
    _warm_encoder(encoder, batch)
    # Encoder, pipeline, encoder again: a neighbour's load that comes and goes during the
    # run then weighs on both sides of the ratio.
    n1, s1 = _encoder_rate(encoder, pixels, batch)
    jpeg = _index_all(encoder, params, params.folder, ".jpg", "small-jpg")
    n2, s2 = _encoder_rate(encoder, pixels, batch)
    out: dict[str, Any] = {
        "batch_size": batch,
        "encoder_img_s": (n1 + n2) / (s1 + s2),
        "jpeg": jpeg,
        **runtime_info(encoder),
    }
    if params.png_folder:
        out["png"] = _index_all(encoder, params, params.png_folder, ".png", "small-png")
    return {**out, **_gpu(encoder)}


def reindex(params: PhaseParams) -> dict[str, Any]:
    """index_folder over a folder whose every file is already in the store, unchanged."""
    from .bench_corpus import clip_like_vectors
    from .images import read_image_file
    from .store import ImageRecord, StoredImage

    encoder = _load(params)
    store = _fresh_store(encoder, params, "reindex")
    folder = Path(params.folder).resolve()
    files = sorted(p for p in folder.rglob("*.jpg") if not p.name.startswith("."))
    if not files:
        raise PhaseError(f"no files in {folder}")
    # The store is filled as a first index_folder would have filled it (same paths, sizes,
    # mtimes, hashes), without embedding thousands of images through the model.
    records = []
    vectors = clip_like_vectors(len(files), encoder.info.dim, params.seed)
    for path, vector in zip(files, vectors, strict=True):
        raw = read_image_file(path)  # the size, mtime and hash index_folder itself records
        with Image.open(path) as img:
            width, height = img.size
        stored = StoredImage(str(path), raw.size_bytes, raw.mtime_ns, raw.content_hash, width, height)
        records.append(ImageRecord(stored, vector))
    store.upsert(records)
    result, seconds = _index(encoder, store, str(folder))
    if result.scanned != len(files) or result.unchanged != len(files) or result.added or result.updated:
        raise PhaseError(
            f"re-index of {len(files)} files saw {result.scanned} scanned, {result.unchanged} unchanged, "
            f"{result.added} added, {result.updated} updated: the store was not filled as expected"
        )
    return {"files": len(files), "seconds": seconds, "files_s": len(files) / seconds}


def _percentile_ms(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000.0, q))


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def vectors(params: PhaseParams) -> dict[str, Any]:
    """Search latency and recall@10 on a store of `params.vectors` CLIP-like vectors."""
    from ..tools.search_images import SearchImagesInput, search_images
    from .bench_corpus import clip_like_vectors, distinct_queries, text_like_queries
    from .paths import PathPolicy
    from .store import ImageRecord, StoredImage

    encoder = _load(params)
    count, dim = params.vectors, encoder.info.dim
    # The store's paths lie under a real (empty) folder: search_images filters by the
    # allowed folders, as it does for a user, and that filter is part of the cost.
    root = Path(params.run_dir) / f"vectors-{count}"
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    policy = PathPolicy([root])
    store = _fresh_store(encoder, params, f"vectors-{count}")
    matrix = clip_like_vectors(count, dim, params.seed)
    started = time.perf_counter()
    chunk = 50_000  # bounds the record objects alive at once; the store batches below this
    for first in range(0, count, chunk):
        store.upsert(
            [
                ImageRecord(StoredImage(f"{root}/v{i:07d}.jpg", 100_000, 0, "0" * 32, 640, 480), matrix[i])
                for i in range(first, min(count, first + chunk))
            ]
        )
    insert_seconds = time.perf_counter() - started

    texts = distinct_queries(WARMUP_QUERIES + 2 * params.queries, params.seed + count)
    warm, text_set, search_set = (
        texts[:WARMUP_QUERIES],
        texts[WARMUP_QUERIES : WARMUP_QUERIES + params.queries],
        texts[WARMUP_QUERIES + params.queries :],
    )
    _warm_encoder(encoder, 1)
    for query in warm:  # also lets the store load its index before the clock runs
        search_images(encoder, store, policy, SearchImagesInput(query=query, top_k=TOP_K, thumbnails=False))
    text_times, search_times = [], []
    # Text tower and search alternate, query by query: a neighbour's load that comes and
    # goes is then shared by both sides of the ratio. Every query is new, and the cache is
    # emptied besides, so both sides pay for the text tower.
    for text_query, search_query in zip(text_set, search_set, strict=True):
        encoder.clear_text_cache()
        text_times.append(_timed(lambda q=text_query: encoder.embed_texts([q])))
        request = SearchImagesInput(query=search_query, top_k=TOP_K, thumbnails=False)
        search_times.append(_timed(lambda r=request: search_images(encoder, store, policy, r)))

    # Recall@10 of the store's approximate index against the exact answer by brute force.
    probes = text_like_queries(params.queries, dim, params.seed)
    found = 0
    for probe in probes:
        exact = set(np.argpartition(matrix @ probe, -TOP_K)[-TOP_K:].tolist())
        hits = store.query(probe, TOP_K, [root])
        found += len(exact & {int(Path(stored.path).stem[1:]) for stored, _ in hits})
    return {
        "vectors": count,
        "queries": params.queries,
        "insert_vectors_s": count / insert_seconds,
        "text_p50_ms": _percentile_ms(text_times, 50),
        "search_p50_ms": _percentile_ms(search_times, 50),
        "search_p95_ms": _percentile_ms(search_times, 95),
        "recall_at_10": found / (TOP_K * len(probes)),
        **_gpu(encoder),
    }


def build_model(params: PhaseParams) -> dict[str, Any]:
    from .bench_corpus import build_vit_b32

    build_vit_b32(Path(params.folder), seed=params.seed)
    return {"model_dir": params.folder}


def _gpu(encoder: ClipEncoder) -> dict[str, Any]:
    peak = _gpu_peak_mib(encoder)
    return {} if peak is None else {"peak_gpu_mib": peak}


PHASES: dict[str, Callable[[PhaseParams], dict[str, Any]]] = {
    "model": build_model,
    "naive": naive_big,
    "cliplens-big": cliplens_big,
    "small": small,
    "reindex": reindex,
    "vectors": vectors,
}


def run_phase(name: str, params: PhaseParams) -> dict[str, Any]:
    """Run one phase here, in this process; adds its wall time and this process's peak RSS."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}: use one of {', '.join(PHASES)}")
    started = time.perf_counter()
    result = PHASES[name](params)
    result["phase_seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = peak_rss_mib()
    result["pid"] = os.getpid()
    return result

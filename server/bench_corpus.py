"""What `cliplens bench` measures on: photo-like images, many tiny files, CLIP-like vectors,
distinct text queries, and a CLIP with the ViT-B/32 architecture and random weights.

Everything is seeded. Images are cached in the work folder (generating a 12-megapixel
photo takes about a second), so that a rerun goes straight to the measurements.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Bumped when the generator changes, so that an older cache is not mixed with new images.
CORPUS_VERSION = 1
JPEG_QUALITY = 90
TINY_SOURCES = 8  # distinct tiny pictures; the many tiny files are copies of these
TINY_SIZE = (32, 24)
TINY_PER_FOLDER = 1000

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey", "golden")
OBJECTS = (
    "bicycle", "car", "house", "tree", "boat", "cat", "dog", "bird", "horse", "bridge",
    "mountain", "flower", "chair", "lamp", "train", "tower", "kite", "umbrella", "guitar", "cake",
)  # fmt: skip
PLACES = ("on a beach", "in a forest", "in the city", "in the snow", "by a lake", "in a kitchen", "on a street")
TIMES = ("at night", "at dawn", "in the rain", "at noon", "in autumn")


@dataclass(frozen=True)
class CorpusKind:
    name: str
    width: int
    height: int
    suffix: str  # ".jpg" or ".png"

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.width}x{self.height}{self.suffix.replace('.', '-')}"


def _upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D float32 array resized bicubically to `size` (width, height)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(grid, np.float32)).resize(size, Image.Resampling.BICUBIC))


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """An RGB picture with the statistics that matter to a decoder and an encoder.

    Flat colour would compress to almost nothing and decode unrealistically fast: this has
    a sky-to-ground gradient, colour-correlated noise at many scales (1/f, like natural
    images), sharp-edged shapes shaded by that noise, striped texture, and sensor grain.
    """
    rng = np.random.default_rng(seed)
    # The smooth parts are made at a quarter of the size and scaled up: the same look at a
    # sixteenth of the work.
    low = (max(8, width // 4), max(8, height // 4))
    lw, lh = low
    y = np.linspace(0.0, 1.0, lh, dtype=np.float32)[:, None, None]
    horizon = rng.uniform(0.3, 0.7)
    blend = 1.0 / (1.0 + np.exp(-(y - horizon) * rng.uniform(8, 30)))
    top, bottom = rng.uniform(40, 230, 3).astype(np.float32), rng.uniform(20, 200, 3).astype(np.float32)
    field = np.broadcast_to(top * (1 - blend) + bottom * blend, (lh, lw, 3)).copy()
    mix = rng.normal(0.0, 0.35, (3, 3)).astype(np.float32) + np.eye(3, dtype=np.float32)
    cells, amplitude = 3, 60.0
    while cells <= max(lw, lh) // 2:
        gw, gh = max(2, cells * lw // max(lw, lh)), max(2, cells * lh // max(lw, lh))
        octave = np.stack([_upsample(rng.standard_normal((gh, gw), np.float32), low) for _ in range(3)], axis=-1)
        field += amplitude * (octave @ mix)
        cells, amplitude = cells * 2, amplitude * 0.6
    base = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)

    # Shapes: flat colours blended over the base, so each keeps the noise's shading but
    # gains hard edges, the part that costs a JPEG encoder and decoder most.
    pyrng = random.Random(seed)
    overlay = Image.new("RGB", (width, height))
    mask = Image.new("L", (width, height), 0)
    draw_o, draw_m = ImageDraw.Draw(overlay), ImageDraw.Draw(mask)
    scale = min(width, height)
    for _ in range(pyrng.randint(12, 30)):
        colour = tuple(pyrng.randint(0, 255) for _ in range(3))
        cx, cy = pyrng.uniform(0, width), pyrng.uniform(0, height)
        r = scale * pyrng.uniform(0.03, 0.25)
        box = (cx - r, cy - r * pyrng.uniform(0.4, 1.6), cx + r, cy + r * pyrng.uniform(0.4, 1.6))
        shape = pyrng.choice(("ellipse", "rectangle", "polygon", "stripes"))
        if shape == "ellipse":
            draw_o.ellipse(box, fill=colour)
            draw_m.ellipse(box, fill=pyrng.randint(120, 220))
        elif shape == "rectangle":
            draw_o.rectangle(box, fill=colour)
            draw_m.rectangle(box, fill=pyrng.randint(120, 220))
        elif shape == "polygon":
            points = [
                (cx + r * pyrng.uniform(-1, 1), cy + r * pyrng.uniform(-1, 1)) for _ in range(pyrng.randint(3, 7))
            ]
            draw_o.polygon(points, fill=colour)
            draw_m.polygon(points, fill=pyrng.randint(120, 220))
        else:
            step = max(2, int(scale * pyrng.uniform(0.002, 0.01)))
            other = tuple(pyrng.randint(0, 255) for _ in range(3))
            x0, y0, x1, y1 = (int(v) for v in box)
            for i, x in enumerate(range(x0, x1, step)):
                draw_o.line((x, y0, x + (y1 - y0) // 3, y1), fill=colour if i % 2 else other, width=max(1, step // 2))
            draw_m.rectangle(box, fill=pyrng.randint(120, 220))
    picture = Image.composite(overlay, base, mask)

    # Texture at the finest scales (foliage, fabric, gravel) and sensor grain: the detail
    # that sets a photo's file size and that the smooth layers above lack.
    detail = np.zeros((height, width), np.float32)
    for div, amp in ((16, 9.0), (4, 6.0)):
        grid = rng.standard_normal((max(2, height // div), max(2, width // div)), np.float32)
        detail += amp * _upsample(grid, (width, height))
    detail += rng.normal(0.0, 2.5, (height, width)).astype(np.float32)
    pixels = np.asarray(picture, np.float32) + detail[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, suffix: str) -> bytes:
    buf = io.BytesIO()
    if suffix == ".png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    # A hidden temporary name (the walker skips dot files), renamed into place: an
    # interrupted run never leaves a half-written image in the cache.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def ensure_images(
    cache: Path, kind: CorpusKind, count: int, seed: int, *, note: Callable[[str], None] | None = None
) -> list[Path]:
    """The first `count` images of `kind`, generated only where the cache lacks them."""
    folder = cache / f"corpus-v{CORPUS_VERSION}" / kind.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:05d}{kind.suffix}" for i in range(count)]
    missing = [p for p in paths if not p.exists()]
    for n, path in enumerate(missing, start=1):
        if note and (n == 1 or n % 8 == 0):
            note(f"generating {kind.width}x{kind.height} {kind.suffix[1:]} images: {n}/{len(missing)}")
        index = int(path.stem.split("_")[1])
        # Each image has its own seed, so the cache does not depend on the counts asked for.
        img = photo_like(kind.width, kind.height, seed=zlib.crc32(f"{seed}/{kind.name}/{index}".encode()))
        _write_atomic(path, _encode(img, kind.suffix))
    return paths


def link_view(files: Sequence[Path], dest: Path) -> Path:
    """A folder holding exactly `files`: hard links where the filesystem allows, else copies."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in files:
        target = dest / src.name
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)
    return dest


def ensure_tiny_files(cache: Path, count: int, seed: int, *, note: Callable[[str], None] | None = None) -> Path:
    """A folder of `count` tiny JPEGs in subfolders, each its own file (own inode).

    The unchanged re-index only stats them, so copies of a few pictures are enough; hard
    links would not do, because the walker counts each inode once.
    """
    folder = cache / f"corpus-v{CORPUS_VERSION}" / f"tiny-{count}"
    done = folder / ".complete"
    if done.exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    if note:
        note(f"making {count} tiny files")
    w, h = TINY_SIZE
    sources = [_encode(photo_like(w, h, seed=seed * 1000 + i), ".jpg") for i in range(TINY_SOURCES)]
    for i in range(count):
        sub = folder / f"d{i // TINY_PER_FOLDER:04d}"
        if i % TINY_PER_FOLDER == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:06d}.jpg").write_bytes(sources[i % TINY_SOURCES])
    done.write_text(f"{count}\n")
    return folder


def clip_like_vectors(count: int, dim: int, seed: int, *, start: int = 0) -> np.ndarray:
    """Rows `start` to `start + count` of a seeded set of unit vectors shaped like CLIP's.

    Real CLIP image embeddings are not spread uniformly over the sphere: they sit in a
    narrow cone around a common mean (pairwise cosine about 0.5) and cluster by content.
    Uniform random vectors would make nearest-neighbour search look easier than it is.
    """
    space = np.random.default_rng([seed, 1])
    mean = _unit(space.standard_normal(dim))
    clusters = 256
    centres = _unit(space.standard_normal((clusters, dim)))
    spread = space.uniform(0.35, 0.75, clusters)  # some topics are tight, some loose
    out = np.empty((count, dim), np.float32)
    block = 65_536
    # Fixed blocks of rows with their own seeds: any slice of the set comes out the same.
    for first in range(start - start % block, start + count, block):
        rng = np.random.default_rng([seed, 2, first // block])
        topic = rng.integers(0, clusters, block)
        noise = rng.standard_normal((block, dim), np.float32) * (0.5 / np.sqrt(dim))
        rows = 0.7 * mean + spread[topic, None] * centres[topic] + noise
        lo, hi = max(first, start), min(first + block, start + count)
        out[lo - start : hi - start] = _unit(rows[lo - first : hi - first])
    return out


def text_like_queries(count: int, dim: int, seed: int) -> np.ndarray:
    """Query vectors as CLIP's text tower gives them: near a topic of the image set but in
    a cone of their own (the modality gap), so that their cosines to images are about 0.3."""
    space = np.random.default_rng([seed, 1])
    mean = _unit(space.standard_normal(dim))
    centres = _unit(space.standard_normal((256, dim)))
    rng = np.random.default_rng([seed, 3])
    gap = _unit(rng.standard_normal(dim))
    topic = rng.integers(0, 256, count)
    noise = rng.standard_normal((count, dim)) * (0.6 / np.sqrt(dim))
    return _unit(0.35 * mean + 0.5 * centres[topic] + 0.9 * gap + noise)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def distinct_queries(count: int, seed: int) -> list[str]:
    """`count` different search phrases, so that no timing is served by a text cache."""
    phrases = [f"a photo of a {c} {o} {p} {t}" for c, o, p, t in itertools.product(COLOURS, OBJECTS, PLACES, TIMES)]
    if count > len(phrases):
        raise ValueError(f"at most {len(phrases)} distinct queries can be made, {count} were asked for")
    random.Random(seed).shuffle(phrases)
    return phrases[:count]


def query_corpus() -> list[str]:
    """The text the bench model's tokenizer is trained on: every word of the queries."""
    words = [*COLOURS, *OBJECTS, *PLACES, *TIMES]
    return ["a photo of a " + w for w in words] + distinct_queries(2000, 0)


def build_vit_b32(out_dir: Path, seed: int = 0) -> Path:
    """A CLIP with ViT-B/32's architecture (CLIPConfig's defaults) and random weights.

    Speed does not depend on the weights' values, so this stands in for
    openai/clip-vit-base-patch32 on a machine without it. The tokenizer is the toy BPE,
    trained on the bench's own query words, so that queries are as few tokens as real ones.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .toytrain import train_tokenizer

    tokenizer = train_tokenizer(query_corpus(), vocab_size=2000, context=77)
    text = {
        "vocab_size": len(tokenizer),
        # Must be the tokenizer's end-of-text id: the value 2 selects an older pooling rule.
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text))
    images = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir

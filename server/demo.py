"""`cliplens demo`: the whole product end to end, offline, through the tools' own cores.

It renders a small folder of drawn objects, indexes it, searches "a photo of a red
bicycle", writes a contact sheet of the hits, and explains a 5×5 similarity matrix.
Without --model it builds a small randomly initialised CLIP first, so it needs no
download; that model's rankings carry no meaning (a trained bundled model replaces it).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 200, 30),
    "black": (20, 20, 20),
}
OBJECTS = ("bicycle", "car", "house", "tree", "boat")
QUERY = "a photo of a red bicycle"


def _draw(kind: str, colour: tuple[int, int, int], rng: random.Random, size: int = 160) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 235, 225))
    d = ImageDraw.Draw(img)
    s = rng.uniform(0.8, 1.1)
    cx, cy = size / 2 + rng.uniform(-10, 10), size / 2 + rng.uniform(-10, 10)

    def p(x: float, y: float) -> tuple[float, float]:
        return cx + x * s, cy + y * s

    if kind == "bicycle":
        for wx in (-35, 35):
            d.ellipse([p(wx - 22, 0), p(wx + 22, 44)], outline=colour, width=5)
        d.line([p(-35, 22), p(-5, -10), p(35, 22), p(-5, 22), p(-35, 22)], fill=colour, width=5)
        d.line([p(-5, -10), p(25, -10), p(35, 22)], fill=colour, width=5)
    elif kind == "car":
        d.rectangle([p(-55, -10), p(55, 20)], fill=colour)
        d.rectangle([p(-30, -32), p(30, -10)], fill=colour)
        for wx in (-32, 32):
            d.ellipse([p(wx - 13, 10), p(wx + 13, 36)], fill=(30, 30, 30))
    elif kind == "house":
        d.rectangle([p(-40, -5), p(40, 50)], fill=colour)
        d.polygon([p(-50, -5), p(0, -50), p(50, -5)], fill=(120, 60, 40))
        d.rectangle([p(-10, 20), p(10, 50)], fill=(90, 60, 30))
    elif kind == "tree":
        d.rectangle([p(-8, 10), p(8, 60)], fill=(110, 70, 30))
        d.ellipse([p(-40, -55), p(40, 25)], fill=colour)
    else:  # boat
        d.polygon([p(-55, 15), p(55, 15), p(35, 40), p(-35, 40)], fill=colour)
        d.line([p(0, 15), p(0, -50)], fill=(60, 40, 20), width=4)
        d.polygon([p(3, -48), p(40, 10), p(3, 10)], fill=(250, 250, 250))
    return img.rotate(rng.uniform(-8, 8), fillcolor=(235, 235, 225))


def render_folder(folder: Path, seed: int = 0) -> list[tuple[Path, str]]:
    """One image per (colour, object), named by what it shows; returns (path, caption) pairs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for obj in OBJECTS:
        for name, rgb in COLOURS.items():
            path = folder / f"{name}_{obj}.png"
            _draw(obj, rgb, rng).save(path)
            pairs.append((path, f"a photo of a {name} {obj}"))
    return pairs


def run_demo(out: Path, *, model: str | None = None, device: str = "auto") -> int:
    from ..tools import explain_similarity_matrix as ex
    from ..tools import index_folder as ix
    from ..tools import search_images as se
    from .app import open_engine
    from .cli import format_matrix
    from .config import Settings
    from .images import load_image
    from .render import contact_sheet_png, heatmap_png

    out = out.absolute()
    images = out / "images"
    pairs = render_folder(images)
    print(f"1. rendered {len(pairs)} images into {images}")
    if model is None:
        from .tinymodel import build_tiny_model

        model = str(build_tiny_model(out / "tiny-clip", image_size=64, width=64, projection_dim=32))
        print(f"   built a small random CLIP in {model} (no download; its rankings carry no meaning)")
    settings = Settings(model=model, device=device, db_dir=out / "store", allow=[out])
    with open_engine(settings) as app:
        r = ix.index_folder(app.encoder, app.store, app.policy, ix.IndexFolderInput(path=str(images)))
        print(
            f"2. indexed: {r.added} added, {r.updated} updated, {r.unchanged} unchanged, "
            f"{r.skipped_count} skipped, {r.images_per_second:.1f} img/s on {r.device}"
        )
        s = se.search_images(app.encoder, app.store, app.policy, se.SearchImagesInput(query=QUERY, top_k=8))
        print(f"3. search {QUERY!r}:")
        for h in s.hits:
            print(f"   {h.rank}. {h.score:+.4f}  {Path(h.path).name}")
        sheet = out / "contact_sheet.png"
        sheet.write_bytes(
            contact_sheet_png(
                [load_image(Path(h.path)).image for h in s.hits], [f"{h.rank}. {h.score:.3f}" for h in s.hits]
            )
        )
        print(f"   contact sheet: {sheet}")
        chosen = [pairs[i * len(COLOURS) + i] for i in range(5)]  # five different objects and colours
        e = ex.explain_similarity_matrix(
            app.encoder,
            app.policy,
            ex.ExplainInput(images=[str(p) for p, _ in chosen], captions=[c for _, c in chosen]),
        )
        print("4. the 5×5 similarity matrix (rows images, columns captions; the diagonal holds the true pairs):")
        for k, (_, caption) in enumerate(chosen, start=1):
            print(f"   T{k} = {caption!r}")
        print(format_matrix(e.cosine, e.loss, e.loss_kind, e.readings))
        heat = out / "heatmap.png"
        import numpy as np

        heat.write_bytes(heatmap_png(np.array(e.cosine)))
        print(f"   heatmap: {heat}")
    sys.stdout.flush()
    return 0

"""`cliplens demo`: the whole product end to end, offline, through the tools' own cores.

It renders a folder of toy-world scenes, indexes it, searches "a photo of a red bicycle"
(a pair the bundled model never saw in training), writes a contact sheet of the hits, and
explains the 5×5 similarity matrix of five rendered image-caption pairs.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np

QUERY = "a photo of a red bicycle"
NEGATED = "a photo of a bicycle that is not red"  # CLIP ignores "not": searched as "... - red"
FOLDER_SCENES = 300
EXTRA_RED_BICYCLES = 6  # so a top 8 can be all-correct even in a small folder
LESSON_PAIRS = (("red", "bicycle"), ("blue", "car"), ("green", "tree"), ("yellow", "boat"), ("purple", "flower"))


def render_demo_folder(folder: Path, seed: int = 7) -> list[tuple[Path, str]]:
    """A toy-world folder (held-out pairs included) plus the five lesson pairs; returns those pairs."""
    from .toyworld import render, render_folder, single_scene

    render_folder(folder, count=FOLDER_SCENES, seed=seed, held_out=True)
    rng = random.Random(seed + 1)
    for i in range(EXTRA_RED_BICYCLES):
        render(single_scene(rng, "red", "bicycle")).save(folder / f"red_bicycle_{i}.png")
    pairs = []
    for colour, kind in LESSON_PAIRS:
        path = folder / "lesson" / f"{colour}_{kind}.png"
        path.parent.mkdir(exist_ok=True)
        render(single_scene(rng, colour, kind)).save(path)
        pairs.append((path, f"a photo of a {colour} {kind}."))
    return pairs


def run_demo(out: Path, *, model: str = "toy", device: str = "auto") -> int:
    from ..tools import explain_similarity_matrix as ex
    from ..tools import index_folder as ix
    from ..tools import search_images as se
    from .app import open_engine
    from .cli import format_matrix
    from .config import Settings
    from .render import heatmap_png

    out = out.absolute()
    images = out / "images"
    pairs = render_demo_folder(images)
    print(f"1. rendered {FOLDER_SCENES + EXTRA_RED_BICYCLES + len(pairs)} toy-world scenes into {images}")
    settings = Settings(model=model, device=device, db_dir=out / "store", allow=[out])
    with open_engine(settings, resume_jobs=False) as app:
        r = ix.index_folder(app.encoder, app.store, app.policy, ix.IndexFolderInput(path=str(images)))
        print(
            f"2. indexed with model {r.model!r}: {r.added} added, {r.updated} updated, {r.unchanged} unchanged, "
            f"{r.skipped_count} skipped, {r.images_per_second:.1f} img/s on {r.device}"
        )
        s = se.search_images(app.encoder, app.store, app.policy, se.SearchImagesInput(query=QUERY, top_k=8))
        print(f"3. search {QUERY!r} (the model never saw a red bicycle in training):")
        for h in s.hits:
            print(f"   {h.rank}. {h.score:+.4f}  {Path(h.path).relative_to(images)}")
        print(f"   {s.why}")
        negated = se.search_images(
            app.encoder, app.store, app.policy, se.SearchImagesInput(query=NEGATED, top_k=4, rewrite_negation=True)
        )
        print(f"   {NEGATED!r}: {negated.warnings[0] if negated.warnings else 'no warning'}")
        for h in negated.hits:
            print(f"   {h.rank}. {h.score:+.4f}  {Path(h.path).relative_to(images)}  terms {h.contributions}")
        sheet = out / "contact_sheet.png"
        _, png = se.render_images(s, app.policy, sheet=True)  # the sheet search_images attaches
        if png is not None:
            sheet.write_bytes(png)
            print(f"   contact sheet: {sheet}")
        request = ex.ExplainInput(images=[str(p) for p, _ in pairs], captions=[c for _, c in pairs])
        e = ex.explain_similarity_matrix(app.encoder, app.policy, request)
        print("4. the 5×5 similarity matrix (rows images, columns captions; the true pairs are on the diagonal):")
        for k, (_, caption) in enumerate(pairs, start=1):
            print(f"   T{k} = {caption!r}")
        print(format_matrix(e.cosine, e.loss, e.loss_kind, e.readings))
        heat = out / "heatmap.png"
        heat.write_bytes(heatmap_png(np.array(e.cosine)))
        print(f"   heatmap: {heat}")
    sys.stdout.flush()
    return 0

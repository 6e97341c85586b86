"""Failure-mode probes: counting, text in images, negation, spatial relations, fine-grained classes.

On the toy world every scene knows its truth, so a probe is a set of small groups of images and
captions whose true pairs are known, scored as "does the model pick the true one" against chance.
A folder has no truth: folder_probes.py probes it by minimal changes instead.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass, field
from importlib.resources import files

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .encoder import ClipEncoder
from .render import basic_layout
from .toyworld import BACKGROUNDS, COLOURS, KINDS, WORDS, Scene, ToyObject, render

MODES = ("counting", "text_in_images", "negation", "spatial", "fine_grained")
DISPLAY_ROWS = 6
NEGATIONS = ("a {k} that is not {c}", "a {k} without {c}", "no {c} {k}")
# Kinds the toy model has seen written as words, so a painted word is one it can read.
READABLE_KINDS = tuple(w for w in WORDS if w in KINDS)
# Toy kinds that share a silhouette: a round top on a stick, a long low body.
LOOK_ALIKES = (("umbrella", "flower", "balloon", "tree"), ("fish", "car", "boat", "bicycle"))
TRAINING_SIZES = {1: 0.3, 2: 0.2, 3: 0.16}  # how the toy world draws 1-3 copies: the count shows in the size
COUNT_XS = {1: (0.5,), 2: (0.3, 0.7), 3: (0.2, 0.5, 0.8)}
NUMBER = {1: "one", 2: "two", 3: "three", 4: "four"}


@functools.cache
def failure_texts() -> dict:
    """prompts/failure_modes.json: per-mode titles and reasons, the subject vocabulary, sibling sets."""
    data = json.loads(files("cliplens.prompts").joinpath("failure_modes.json").read_text(encoding="utf-8"))
    if tuple(data["modes"]) != MODES:
        raise RuntimeError(f"failure_modes.json: modes {list(data['modes'])} do not match {list(MODES)}")
    return data


@dataclass
class Group:
    """A few images and captions with known true cells; cosines are compared only within a group."""

    images: list[Image.Image]
    captions: list[str]
    names: list[str]  # what each image shows
    scored: list[tuple[int, int]]  # (image, caption) cells that are true and that the metric checks
    by_caption: bool = False  # True: each scored caption picks among the images; False: each image picks a caption
    control_scored: list[tuple[int, int]] | None = None  # cells of a control asked of these same images


@dataclass
class ProbeOutcome:
    mode: str
    captions: list[str]
    images: list[str]
    cosine: np.ndarray  # (len(images), len(captions)), the displayed example
    metric: str
    value: float
    chance: float | None
    measured: int  # decisions (toy world) or images (folder) behind the value
    verdict: str
    reason: str
    how: str
    control: float | None = None
    control_note: str | None = None
    details: dict[str, float] = field(default_factory=dict)


def plural(noun: str) -> str:
    if noun.endswith(("fish", "sheep")):
        return noun
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def paint_word(image: Image.Image, word: str, *, at: float = 0.5) -> Image.Image:
    """A copy of `image` with `word` printed on a white label across it (a typographic attack)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    # The basic layout: `word` is caller text, and raqm can fail on hostile text (see render.font).
    font = basic_layout(ImageFont.load_default(size=max(10, min(out.size) // 6)))
    box = draw.textbbox((0, 0), word, font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    x, y = (out.width - w) / 2, out.height * at - h / 2
    pad = max(2, h // 4)
    draw.rectangle([x - pad, y - pad, x + w + pad, y + h + pad], fill=(255, 255, 255))
    draw.text((x - box[0], y - box[1]), word, fill=(0, 0, 0), font=font)
    return out


def _background(rng: random.Random, colours: list[str]) -> str:
    def far(c: str, b: str) -> bool:
        return sum((x - y) ** 2 for x, y in zip(COLOURS[c], BACKGROUNDS[b], strict=True)) > 90**2

    names = [b for b in BACKGROUNDS if all(far(c, b) for c in colours)]
    return rng.choice(names or list(BACKGROUNDS))


def _copies(rng: random.Random, colour: str, kind: str, count: int, size: float, background: str) -> Image.Image:
    y = rng.uniform(0.42, 0.58)
    objects = [ToyObject(kind, colour, (x + rng.uniform(-0.03, 0.03), y), size) for x in COUNT_XS[count]]
    return render(Scene(objects=objects, background=background))


def _single(rng: random.Random, colour: str, kind: str, size: float, background: str) -> Image.Image:
    obj = ToyObject(kind, colour, (rng.uniform(0.45, 0.55), rng.uniform(0.45, 0.55)), size, rng.uniform(-10, 10))
    return render(Scene(objects=[obj], background=background))


# Each builder draws one group and, when asked, its control: the same question without the difficulty.
def _counting(rng: random.Random, i: int, with_control: bool) -> tuple[Group, Group | None]:
    c, k = rng.choice(list(COLOURS)), rng.choice(KINDS)
    bg, size = _background(rng, [c]), rng.uniform(0.14, 0.18)
    counts = (1, 2, 3)
    captions = [f"{NUMBER[n]} {c} {k if n == 1 else plural(k)}" for n in counts]
    names = [f"{n} × {c} {k}, all drawn the same size" for n in counts]
    group = Group([_copies(rng, c, k, n, size, bg) for n in counts], captions, names, [(j, j) for j in range(3)])
    if not with_control:
        return group, None
    control_images = [_copies(rng, c, k, n, TRAINING_SIZES[n], bg) for n in counts]
    return group, Group(control_images, captions, names, group.scored)


def _text_in_images(rng: random.Random, i: int, with_control: bool) -> tuple[Group, Group | None]:
    a, b = rng.sample(READABLE_KINDS, 2)
    c = rng.choice(list(COLOURS))
    bg = _background(rng, [c])
    plain = [_single(rng, c, a, 0.34, bg), _single(rng, c, b, 0.34, bg)]
    captions = [f"a photo of a {a}.", f"a photo of a {b}."]
    names = [f'a {c} {a} labelled "{b}"', f'a {c} {b} labelled "{a}"']
    scored = [(0, 0), (1, 1)]
    group = Group([paint_word(plain[0], b), paint_word(plain[1], a)], captions, names, scored)
    return group, Group(plain, captions, [f"a {c} {a}", f"a {c} {b}"], scored) if with_control else None


def _negation(rng: random.Random, i: int, with_control: bool) -> tuple[Group, Group | None]:
    k = rng.choice(KINDS)
    c, other = rng.sample(list(COLOURS), 2)
    negated = NEGATIONS[i % len(NEGATIONS)].format(k=k, c=c)
    images = [_single(rng, c, k, 0.32, _background(rng, [c])), _single(rng, other, k, 0.32, _background(rng, [other]))]
    captions = [f"a photo of a {c} {k}.", negated]
    names = [f"a {c} {k}", f"a {other} {k}"]
    # The negated caption must pick the image that lacks the colour; the control asks the plain caption.
    return Group(images, captions, names, [(1, 1)], by_caption=True, control_scored=[(0, 0)]), None


def _spatial(rng: random.Random, i: int, with_control: bool) -> tuple[Group, Group | None]:
    (c1, c2), (k1, k2) = rng.sample(list(COLOURS), 2), rng.sample(KINDS, 2)
    bg = _background(rng, [c1, c2])

    def pair(left: tuple[str, str], right: tuple[str, str]) -> Image.Image:
        objs = [ToyObject(left[1], left[0], (0.27, 0.5), 0.2), ToyObject(right[1], right[0], (0.73, 0.5), 0.2)]
        return render(Scene(objects=objs, background=bg))

    a, b = (c1, k1), (c2, k2)
    captions = [f"a {c1} {k1} to the left of a {c2} {k2}", f"a {c2} {k2} to the left of a {c1} {k1}"]
    names = [f"{c1} {k1} left, {c2} {k2} right", f"{c2} {k2} left, {c1} {k1} right"]
    return Group([pair(a, b), pair(b, a)], captions, names, [(0, 0), (1, 1)]), None


def _fine_grained(rng: random.Random, i: int, with_control: bool) -> tuple[Group, Group | None]:
    kinds = LOOK_ALIKES[i % len(LOOK_ALIKES)]
    c = rng.choice([c for c in COLOURS if c not in ("white", "black")])
    bg = _background(rng, [c])
    captions = [f"a photo of a {c} {k}." for k in kinds]
    scored = [(j, j) for j in range(len(kinds))]
    small = Group([_single(rng, c, k, 0.12, bg) for k in kinds], captions, [f"a small {c} {k}" for k in kinds], scored)
    if not with_control:
        return small, None
    return small, Group([_single(rng, c, k, 0.32, bg) for k in kinds], captions, [f"a {c} {k}" for k in kinds], scored)


BUILDERS = {
    "counting": _counting,
    "text_in_images": _text_in_images,
    "negation": _negation,
    "spatial": _spatial,
    "fine_grained": _fine_grained,
}


def verdict(value: float, chance: float, n: int) -> str:
    """A word on `value` against chance, with ±2 binomial standard errors as the noise band."""
    band = 2 * math.sqrt(chance * (1 - chance) / max(n, 1))
    if value < chance - band:
        return "below chance: systematically wrong, it prefers the wrong answer"
    if value <= chance + band:
        return "near chance: fails"
    skill = (value - chance) / (1 - chance)
    if skill >= 0.8:
        return "works here"
    if skill >= 0.4:
        return "partly works: well above chance, far from reliable"
    return "weak: above chance, but barely"


def _right(cos: np.ndarray, cell: tuple[int, int], by_caption: bool) -> int:
    i, j = cell
    return int(cos[:, j].argmax() == i) if by_caption else int(cos[i].argmax() == j)


def _accuracy(encoder: ClipEncoder, groups: list[Group]) -> tuple[float, int, float | None, np.ndarray, np.ndarray]:
    """(share of scored cells the model gets right, how many, the same for control_scored cells,
    image vectors, caption vectors)."""
    image_vecs = encoder.embed_images([im for g in groups for im in g.images]).astype(np.float64)
    text_vecs = encoder.embed_texts([c for g in groups for c in g.captions]).astype(np.float64)
    hits, controls, i0, t0 = [], [], 0, 0
    for g in groups:
        cos = image_vecs[i0 : i0 + len(g.images)] @ text_vecs[t0 : t0 + len(g.captions)].T
        hits += [_right(cos, cell, g.by_caption) for cell in g.scored]
        controls += [_right(cos, cell, g.by_caption) for cell in g.control_scored or []]
        i0, t0 = i0 + len(g.images), t0 + len(g.captions)
    control = float(np.mean(controls)) if controls else None
    return float(np.mean(hits)), len(hits), control, image_vecs, text_vecs


def toy_probe(encoder: ClipEncoder, mode: str, samples: int, seed: int) -> ProbeOutcome:
    """One probe on `samples` freshly drawn groups; the first groups (up to 6 images) are the example.
    A control, where the mode has one, is measured on the first half of the groups (at least 8)."""
    texts = failure_texts()["modes"][mode]
    rng = random.Random(f"{seed}:{mode}")  # one stream per mode: choosing fewer modes changes no number
    with_control = max(8, samples // 2)
    drawn = [BUILDERS[mode](rng, i, i < with_control) for i in range(samples)]
    groups = [g for g, _ in drawn]
    value, n, control, image_vecs, text_vecs = _accuracy(encoder, groups)
    control_groups = [c for _, c in drawn if c is not None]
    if control_groups:
        control = _accuracy(encoder, control_groups)[0]
    shown_groups = max(1, DISPLAY_ROWS // len(groups[0].images))
    rows = sum(len(g.images) for g in groups[:shown_groups])
    cols = sum(len(g.captions) for g in groups[:shown_groups])
    first = groups[0]
    chance = 1 / (len(first.images) if first.by_caption else len(first.captions))
    return ProbeOutcome(
        mode=mode,
        captions=[c for g in groups[:shown_groups] for c in g.captions],
        images=[name for g in groups[:shown_groups] for name in g.names],
        cosine=image_vecs[:rows] @ text_vecs[:cols].T,
        metric="caption_to_image_accuracy" if first.by_caption else "image_to_caption_accuracy",
        value=round(value, 4),
        chance=round(chance, 4),
        measured=n,
        verdict=verdict(value, chance, n),
        reason=texts["reason"],
        how=texts["toy_world"] + f"; {samples} seeded groups, each choice only among its own group",
        control=None if control is None else round(control, 4),
        control_note=texts.get("control"),
    )

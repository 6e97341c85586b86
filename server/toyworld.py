"""The toy world: procedurally drawn scenes with known contents, for training and lessons.

Every scene comes from a seed and knows what it shows, so a folder of them is labelled
data: the small CLIP that cliplens ships is trained on it, and the tests and the
evaluation ask it questions whose answers are known. A fixed list of (colour, object)
pairs never appears in training, so a search for "a photo of a red bicycle" tests
composition the model never saw.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "purple": (130, 45, 175),
    "pink": (245, 120, 185),
    "brown": (125, 75, 35),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "sky": (175, 210, 245),
    "sand": (235, 220, 180),
    "grass": (190, 225, 170),
    "grey": (200, 200, 200),
    "night": (35, 40, 75),
    "paper": (245, 242, 235),
}
# What a caption may call each kind; the first name is the canonical one.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "bicycle": ("bicycle", "bike"),
    "car": ("car", "automobile"),
    "house": ("house", "home"),
    "tree": ("tree",),
    "boat": ("boat", "ship"),
    "umbrella": ("umbrella",),
    "cup": ("cup", "mug"),
    "star": ("star",),
    "fish": ("fish",),
    "flower": ("flower", "blossom"),
    "kite": ("kite",),
    "balloon": ("balloon",),
}
KINDS = tuple(SYNONYMS)
# Never rendered in training: the model must compose these from colours and objects it
# saw apart. The first is the one the README's search uses.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "bicycle"),
    ("blue", "car"),
    ("yellow", "umbrella"),
    ("green", "fish"),
    ("purple", "house"),
    ("orange", "cup"),
)
CAPTION_TEMPLATES = (
    "a photo of a {c} {k}.",
    "a {c} {k}",
    "a picture of a {c} {k}.",
    "a drawing of a {c} {k}.",
    "a {k} that is {c}",
    "a {c} {k} on a {b} background",
    "a small {c} {k}.",
    "a big {c} {k}.",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
WORDS = ("cat", "dog", "bicycle", "car", "tree", "boat", "apple", "star")
SIZE = 128


@dataclass
class ToyObject:
    kind: str
    color: str
    position: tuple[float, float]  # centre, as fractions of the width and height
    size: float  # half-extent, as a fraction of the width
    angle: float = 0.0  # degrees, counter-clockwise


@dataclass
class Scene:
    objects: list[ToyObject]
    background: str
    word: str | None = None
    relation: str | None = None  # "left of" when a two-object scene is captioned spatially
    captions: list[str] = field(default_factory=list)


def _contrast_ok(colour: str, background: str) -> bool:
    c, b = COLOURS[colour], BACKGROUNDS[background]
    return sum((x - y) ** 2 for x, y in zip(c, b, strict=True)) > 90**2


def _pick_background(rng: random.Random, colours: list[str]) -> str:
    names = [b for b in BACKGROUNDS if all(_contrast_ok(c, b) for c in colours)]
    return rng.choice(names or list(BACKGROUNDS))


def _pick_pair(rng: random.Random, held_out: bool) -> tuple[str, str]:
    while True:
        pair = (rng.choice(list(COLOURS)), rng.choice(KINDS))
        if held_out or pair not in HELD_OUT_PAIRS:
            return pair


def _caption_single(rng: random.Random, obj: ToyObject, background: str) -> str:
    template = rng.choice(CAPTION_TEMPLATES)
    return template.format(c=obj.color, k=rng.choice(SYNONYMS[obj.kind]), b=background)


def sample_scene(rng: random.Random, *, held_out: bool = True, mix: tuple[float, float] = (0.1, 0.05)) -> Scene:
    """One random scene. `held_out=False` never draws a held-out pair (the training world).

    mix = (share of scenes with 2-3 objects, share of scenes showing a written word).
    """
    roll = rng.random()
    if roll < mix[1]:
        word = rng.choice(WORDS)
        scene = Scene(objects=[], background=_pick_background(rng, ["black"]), word=word)
        scene.captions = [f'the word "{word}"', f"a sign that says {word}", f"text reading {word}"]
        return scene
    if roll < mix[0] + mix[1]:
        return _multi_scene(rng, held_out)
    return single_scene(rng, *_pick_pair(rng, held_out))


def single_scene(rng: random.Random, colour: str, kind: str) -> Scene:
    """One object of the given colour and kind, placed, sized and turned at random."""
    obj = ToyObject(
        kind,
        colour,
        (rng.uniform(0.38, 0.62), rng.uniform(0.38, 0.62)),
        rng.uniform(0.26, 0.4),
        rng.uniform(-15, 15),
    )
    scene = Scene(objects=[obj], background=_pick_background(rng, [colour]))
    scene.captions = [_caption_single(rng, obj, scene.background) for _ in range(3)]
    return scene


def _multi_scene(rng: random.Random, held_out: bool) -> Scene:
    count = rng.choice((2, 3))
    size = 0.16 if count == 3 else 0.2
    xs = [0.2, 0.5, 0.8] if count == 3 else [0.27, 0.73]
    same = rng.random() < 0.5  # "two red cars": the counting lesson
    pairs = [_pick_pair(rng, held_out)] * count if same else [_pick_pair(rng, held_out) for _ in range(count)]
    objects = [
        ToyObject(k, c, (x, rng.uniform(0.42, 0.58)), size, rng.uniform(-10, 10))
        for (c, k), x in zip(pairs, xs, strict=True)
    ]
    scene = Scene(objects=objects, background=_pick_background(rng, [c for c, _ in pairs]))
    if same:
        c, k = pairs[0]
        plural = k if k in ("fish",) else k + "s"
        scene.captions = [f"{NUMBER_WORDS[count]} {c} {plural}", f"a photo of {NUMBER_WORDS[count]} {c} {plural}."]
    else:
        names = [f"a {o.color} {o.kind}" for o in objects]
        scene.captions = [" and ".join(names), "a photo of " + " and ".join(names) + "."]
        if count == 2:
            scene.relation = "left of"
            scene.captions.append(f"{names[0]} to the left of {names[1]}")
            scene.captions.append(f"{names[1]} to the right of {names[0]}")
    return scene


# Each drawer paints one object centred in a square RGBA layer of side 2*r.
Drawer = Callable[[ImageDraw.ImageDraw, float, tuple[int, int, int]], None]


def _bicycle(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    w = max(2, int(r / 8))
    for cx in (0.5 * r, 1.5 * r):
        d.ellipse([cx - 0.42 * r, 1.0 * r, cx + 0.42 * r, 1.84 * r], outline=c, width=w)
    pts = [(0.5 * r, 1.42 * r), (0.95 * r, 0.75 * r), (1.5 * r, 1.42 * r), (1.0 * r, 1.42 * r), (0.5 * r, 1.42 * r)]
    d.line(pts, fill=c, width=w)
    d.line([(0.95 * r, 0.75 * r), (1.35 * r, 0.7 * r), (1.5 * r, 1.42 * r)], fill=c, width=w)
    d.line([(0.85 * r, 0.6 * r), (1.05 * r, 0.6 * r)], fill=c, width=w)


def _car(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    d.rectangle([0.1 * r, 0.9 * r, 1.9 * r, 1.4 * r], fill=c)
    d.polygon([(0.5 * r, 0.9 * r), (0.75 * r, 0.55 * r), (1.3 * r, 0.55 * r), (1.55 * r, 0.9 * r)], fill=c)
    for cx in (0.55 * r, 1.45 * r):
        d.ellipse([cx - 0.22 * r, 1.2 * r, cx + 0.22 * r, 1.64 * r], fill=(25, 25, 25))


def _house(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    d.rectangle([0.4 * r, 0.9 * r, 1.6 * r, 1.75 * r], fill=c)
    d.polygon([(0.25 * r, 0.92 * r), (r, 0.3 * r), (1.75 * r, 0.92 * r)], fill=(110, 55, 40))
    d.rectangle([0.85 * r, 1.3 * r, 1.15 * r, 1.75 * r], fill=(70, 45, 25))


def _tree(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    d.rectangle([0.88 * r, 1.1 * r, 1.12 * r, 1.85 * r], fill=(100, 65, 30))
    d.ellipse([0.4 * r, 0.2 * r, 1.6 * r, 1.3 * r], fill=c)


def _boat(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    d.polygon([(0.15 * r, 1.25 * r), (1.85 * r, 1.25 * r), (1.5 * r, 1.7 * r), (0.5 * r, 1.7 * r)], fill=c)
    d.line([(r, 1.25 * r), (r, 0.25 * r)], fill=(80, 55, 30), width=max(2, int(r / 10)))
    d.polygon([(1.05 * r, 0.3 * r), (1.65 * r, 1.15 * r), (1.05 * r, 1.15 * r)], fill=(235, 235, 235))


def _umbrella(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    d.pieslice([0.2 * r, 0.35 * r, 1.8 * r, 1.65 * r], 180, 360, fill=c)
    w = max(2, int(r / 10))
    d.line([(r, r), (r, 1.7 * r)], fill=(60, 60, 60), width=w)
    d.arc([0.75 * r, 1.5 * r, r, 1.8 * r], 0, 180, fill=(60, 60, 60), width=w)


def _cup(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    d.polygon([(0.5 * r, 0.5 * r), (1.4 * r, 0.5 * r), (1.3 * r, 1.6 * r), (0.6 * r, 1.6 * r)], fill=c)
    d.arc([1.15 * r, 0.75 * r, 1.75 * r, 1.3 * r], 270, 90, fill=c, width=max(2, int(r / 7)))


def _star(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    pts = []
    for i in range(10):
        rad = 0.85 * r if i % 2 == 0 else 0.35 * r
        a = math.pi / 2 + i * math.pi / 5
        pts.append((r + rad * math.cos(a), r - rad * math.sin(a)))
    d.polygon(pts, fill=c)


def _fish(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    d.ellipse([0.2 * r, 0.65 * r, 1.4 * r, 1.35 * r], fill=c)
    d.polygon([(1.3 * r, r), (1.85 * r, 0.6 * r), (1.85 * r, 1.4 * r)], fill=c)
    d.ellipse([0.45 * r, 0.85 * r, 0.6 * r, r], fill=(20, 20, 20))


def _flower(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    d.line([(r, r), (r, 1.9 * r)], fill=(40, 120, 40), width=max(2, int(r / 9)))
    for i in range(6):
        a = i * math.pi / 3
        px, py = r + 0.42 * r * math.cos(a), 0.85 * r + 0.42 * r * math.sin(a)
        d.ellipse([px - 0.28 * r, py - 0.28 * r, px + 0.28 * r, py + 0.28 * r], fill=c)
    d.ellipse([0.8 * r, 0.65 * r, 1.2 * r, 1.05 * r], fill=(245, 200, 40) if c != COLOURS["yellow"] else (120, 70, 20))


def _kite(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    d.polygon([(r, 0.15 * r), (1.55 * r, 0.75 * r), (r, 1.45 * r), (0.45 * r, 0.75 * r)], fill=c)
    d.line([(r, 1.45 * r), (0.8 * r, 1.65 * r), (1.1 * r, 1.8 * r), (0.9 * r, 1.95 * r)], fill=(60, 60, 60), width=2)


def _balloon(d: ImageDraw.ImageDraw, r: float, c: tuple[int, int, int]) -> None:
    d.ellipse([0.5 * r, 0.15 * r, 1.5 * r, 1.35 * r], fill=c)
    d.line([(r, 1.35 * r), (0.9 * r, 1.6 * r), (1.05 * r, 1.9 * r)], fill=(60, 60, 60), width=2)


DRAWERS: dict[str, Drawer] = {
    "bicycle": _bicycle,
    "car": _car,
    "house": _house,
    "tree": _tree,
    "boat": _boat,
    "umbrella": _umbrella,
    "cup": _cup,
    "star": _star,
    "fish": _fish,
    "flower": _flower,
    "kite": _kite,
    "balloon": _balloon,
}


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    canvas = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    for obj in scene.objects:
        r = obj.size * size
        side = max(4, int(2 * r))
        layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        DRAWERS[obj.kind](ImageDraw.Draw(layer), side / 2, COLOURS[obj.color])
        layer = layer.rotate(obj.angle, resample=Image.Resampling.BICUBIC, expand=True)
        x = int(obj.position[0] * size - layer.width / 2)
        y = int(obj.position[1] * size - layer.height / 2)
        canvas.paste(layer, (x, y), layer)
    if scene.word:
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=max(10, size // 6))
        ink = (250, 250, 250) if scene.background == "night" else (20, 20, 20)
        box = draw.textbbox((0, 0), scene.word, font=font)
        w, h = box[2] - box[0], box[3] - box[1]
        draw.text(((size - w) / 2 - box[0], (size - h) / 2 - box[1]), scene.word, fill=ink, font=font)
    return canvas


def scenes(seed: int, *, held_out: bool = True, mix: tuple[float, float] = (0.1, 0.05)) -> Iterator[Scene]:
    """An endless, reproducible stream of scenes."""
    rng = random.Random(seed)
    while True:
        yield sample_scene(rng, held_out=held_out, mix=mix)


def scene_record(scene: Scene, file: str) -> dict[str, object]:
    return {
        "file": file,
        "objects": [asdict(o) for o in scene.objects],
        "background": scene.background,
        "word": scene.word,
        "relation": scene.relation,
        "captions": scene.captions,
    }


def render_folder(out: Path, *, count: int, seed: int, held_out: bool = True, size: int = SIZE) -> Path:
    """Write `count` PNG scenes and their labels.jsonl into `out`; returns the labels file."""
    out.mkdir(parents=True, exist_ok=True)
    labels = out / "labels.jsonl"
    stream = scenes(seed, held_out=held_out)
    with labels.open("w", encoding="utf-8") as fh:
        for i in range(count):
            scene = next(stream)
            name = f"scene_{i:05d}.png"
            render(scene, size).save(out / name)
            fh.write(json.dumps(scene_record(scene, name)) + "\n")
    return labels

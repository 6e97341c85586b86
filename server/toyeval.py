"""Evaluate a CLIP on a fresh toy world: zero-shot accuracy, retrieval, and failure probes.

The probes are there to show CLIP's known failures, not to hide them: counting, negation,
spatial relations and rendered words are measured the same way on every model.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np

from .encoder import ClipEncoder
from .toyworld import COLOURS, HELD_OUT_PAIRS, KINDS, WORDS, Scene, ToyObject, render, sample_scene, single_scene

SEEN_PAIRS: tuple[tuple[str, str], ...] = (("red", "car"), ("blue", "bicycle"), ("green", "tree"), ("yellow", "star"))
KIND_TEMPLATE = "a photo of a {c} {k}."


@dataclass
class ToyReport:
    seed: int
    model: str
    object_accuracy: float
    colour_accuracy: float
    held_out_precision_at_10: dict[str, float]
    seen_precision_at_10: dict[str, float]
    mean_held_out_precision_at_10: float
    probes: dict[str, float] = field(default_factory=dict)
    probe_notes: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _embed_scenes(encoder: ClipEncoder, scenes: list[Scene]) -> np.ndarray:
    return encoder.embed_images([render(s) for s in scenes])


def class_vectors(encoder: ClipEncoder) -> tuple[np.ndarray, np.ndarray]:
    """(kinds, colours) zero-shot class vectors. Each class is an ensemble over the other
    attribute, e.g. "red" averages "a photo of a red car.", "a photo of a red boat.", ..."""
    colours = list(COLOURS)
    kind_vecs = encoder.embed_ensembles([[KIND_TEMPLATE.format(c=c, k=k) for c in colours] for k in KINDS])
    colour_vecs = encoder.embed_ensembles([[KIND_TEMPLATE.format(c=c, k=k) for k in KINDS] for c in colours])
    return kind_vecs, colour_vecs


def zero_shot_accuracy(
    image_vecs: np.ndarray, classes: tuple[np.ndarray, np.ndarray], labels: list[tuple[str, str]]
) -> tuple[float, float]:
    """(object, colour) accuracy of single-object images labelled (colour, kind)."""
    kind_vecs, colour_vecs = classes
    colours = list(COLOURS)
    kind_pred = (image_vecs @ kind_vecs.T).argmax(axis=1)
    colour_pred = (image_vecs @ colour_vecs.T).argmax(axis=1)
    objects = np.mean([KINDS[p] == k for p, (_, k) in zip(kind_pred, labels, strict=True)])
    colour = np.mean([colours[p] == c for p, (c, _) in zip(colour_pred, labels, strict=True)])
    return float(objects), float(colour)


def evaluate(
    encoder: ClipEncoder, seed: int, *, singles: int = 600, gallery: int = 1000, per_pair: int = 12
) -> ToyReport:
    rng = random.Random(seed)
    colours = list(COLOURS)
    test = [single_scene(rng, rng.choice(colours), rng.choice(KINDS)) for _ in range(singles)]
    test_labels = [(s.objects[0].color, s.objects[0].kind) for s in test]
    object_acc, colour_acc = zero_shot_accuracy(_embed_scenes(encoder, test), class_vectors(encoder), test_labels)

    # Retrieval: a gallery of random scenes plus `per_pair` of each evaluated pair.
    pairs = list(HELD_OUT_PAIRS) + list(SEEN_PAIRS)
    pool = [sample_scene(rng, held_out=True, mix=(0.0, 0.0)) for _ in range(gallery)]
    pool += [single_scene(rng, c, k) for c, k in pairs for _ in range(per_pair)]
    pool_vecs = _embed_scenes(encoder, pool)
    labels = [(s.objects[0].color, s.objects[0].kind) for s in pool]
    queries = encoder.embed_texts([KIND_TEMPLATE.format(c=c, k=k) for c, k in pairs])
    precision = {}
    for (c, k), q in zip(pairs, queries, strict=True):
        top = np.argsort(-(pool_vecs @ q))[:10]
        precision[f"{c} {k}"] = float(np.mean([labels[i] == (c, k) for i in top]))
    held = {k: v for k, v in precision.items() if tuple(k.split()) in HELD_OUT_PAIRS}
    seen = {k: v for k, v in precision.items() if k not in held}

    report = ToyReport(
        seed=seed,
        model=encoder.info.model_id,
        object_accuracy=round(object_acc, 4),
        colour_accuracy=round(colour_acc, 4),
        held_out_precision_at_10=held,
        seen_precision_at_10=seen,
        mean_held_out_precision_at_10=round(float(np.mean(list(held.values()))), 4),
        counts={"zero_shot_images": singles, "gallery": len(pool)},
    )
    _probes(encoder, rng, report)
    return report


def _pick_best(encoder: ClipEncoder, scenes: list[Scene], options: list[list[str]], truth: list[int]) -> float:
    """Share of scenes whose highest-scoring caption among their options is the true one."""
    img = _embed_scenes(encoder, scenes)  # (S, D)
    texts = encoder.embed_texts([o for opts in options for o in opts]).reshape(len(scenes), len(options[0]), -1)
    picked = np.einsum("sod,sd->so", texts, img).argmax(axis=1)  # (S,)
    return float(np.mean(picked == np.array(truth)))


def _probes(encoder: ClipEncoder, rng: random.Random, report: ToyReport, n: int = 60) -> None:
    colours = list(COLOURS)
    # Counting: one, two or three of the same object; pick the right number word.
    scenes, options, truth = [], [], []
    for _ in range(n):
        c, k, count = rng.choice(colours), rng.choice(KINDS), rng.choice((1, 2, 3))
        xs = {1: [0.5], 2: [0.27, 0.73], 3: [0.2, 0.5, 0.8]}[count]
        size = {1: 0.3, 2: 0.2, 3: 0.16}[count]
        objs = [ToyObject(k, c, (x, 0.5), size) for x in xs]
        scenes.append(Scene(objects=objs, background="paper" if c != "white" else "night"))
        plural = k if k == "fish" else k + "s"
        options.append([f"one {c} {k}", f"two {c} {plural}", f"three {c} {plural}"])
        truth.append(count - 1)
    report.probes["counting_accuracy"] = round(_pick_best(encoder, scenes, options, truth), 4)
    report.probe_notes["counting_accuracy"] = "pick one/two/three for 1-3 copies; chance is 0.33"

    # Spatial: "A to the left of B" against the swapped sentence.
    scenes, options, truth = [], [], []
    for _ in range(n):
        (c1, k1), (c2, k2) = (rng.choice(colours), rng.choice(KINDS)), (rng.choice(colours), rng.choice(KINDS))
        if (c1, k1) == (c2, k2):
            continue
        scenes.append(
            Scene(objects=[ToyObject(k1, c1, (0.27, 0.5), 0.2), ToyObject(k2, c2, (0.73, 0.5), 0.2)], background="grey")
        )
        options.append([f"a {c1} {k1} to the left of a {c2} {k2}", f"a {c2} {k2} to the left of a {c1} {k1}"])
        truth.append(0)
    report.probes["spatial_accuracy"] = round(_pick_best(encoder, scenes, options, truth), 4)
    report.probe_notes["spatial_accuracy"] = "left-of sentence against its swap; chance is 0.5"

    # Negation: does "a K that is not C" prefer an image of a C K over one of another colour?
    wrong = 0
    for _ in range(n):
        k = rng.choice(KINDS)
        c, other = rng.sample(colours, 2)
        vecs = _embed_scenes(encoder, [single_scene(rng, c, k), single_scene(rng, other, k)])
        q = encoder.embed_texts([f"a {k} that is not {c}"])[0]
        wrong += int(vecs[0] @ q > vecs[1] @ q)
    report.probes["negation_error_rate"] = round(wrong / n, 4)
    report.probe_notes["negation_error_rate"] = (
        "share of cases where 'a K that is not C' scores a C K above a K of another colour; "
        "0 would be understanding, about 0.5 or more means 'not' is ignored"
    )

    # Rendered words: a picture of the written word "car" against real objects.
    kinds_written = [w for w in WORDS if w in KINDS]
    kind_vecs = encoder.embed_texts([f"a photo of a {k}." for k in KINDS])
    hits = 0
    word_scenes = [Scene(objects=[], background="paper", word=w) for w in kinds_written for _ in range(3)]
    for s, vec in zip(word_scenes, _embed_scenes(encoder, word_scenes), strict=True):
        hits += int(KINDS[int(np.argmax(kind_vecs @ vec))] == s.word)
    report.probes["typographic_attack_rate"] = round(hits / len(word_scenes), 4)
    report.probe_notes["typographic_attack_rate"] = (
        "share of pictures of a written object name that zero-shot classifies as that object; "
        f"chance is {1 / len(KINDS):.2f}: CLIP reads"
    )
    report.counts["probe_scenes"] = n


TARGETS = {"object_accuracy": 0.92, "colour_accuracy": 0.95, "mean_held_out_precision_at_10": 0.90}


def format_report(report: ToyReport) -> str:
    def mark(name: str, value: float) -> str:
        return f"{value:.3f}  (target ≥ {TARGETS[name]:.2f}: {'met' if value >= TARGETS[name] else 'MISSED'})"

    lines = [
        f"toy-world evaluation of {report.model}, seed {report.seed}",
        f"  zero-shot object-kind accuracy  {mark('object_accuracy', report.object_accuracy)}",
        f"  zero-shot colour accuracy       {mark('colour_accuracy', report.colour_accuracy)}",
        "  held-out pairs, mean P@10       "
        + mark("mean_held_out_precision_at_10", report.mean_held_out_precision_at_10),
    ]
    lines += [
        f"    {pair:18s} P@10 {p:.2f}  (never seen in training)" for pair, p in report.held_out_precision_at_10.items()
    ]
    lines += [f"    {pair:18s} P@10 {p:.2f}  (seen)" for pair, p in report.seen_precision_at_10.items()]
    lines.append("  failure probes (CLIP-style failures are expected):")
    lines += [f"    {name:24s} {value:.3f}  {report.probe_notes[name]}" for name, value in report.probes.items()]
    return "\n".join(lines)


def write_model_card(out: Path, cfg: object, history: list, report: ToyReport) -> Path:
    """README.md (and eval.json) beside the weights: how the model was trained and what it scored."""
    first, last = history[0], history[-1]
    held = ", ".join(f"{c} {k}" for c, k in HELD_OUT_PAIRS)
    config = json.dumps(asdict(cfg) if is_dataclass(cfg) and not isinstance(cfg, type) else cfg)
    card = f"""# cliplens toy CLIP

A small CLIP (`CLIPModel`) trained from scratch by `cliplens train-toy` on the procedurally drawn
toy world in `cliplens.server.toyworld`. It is cliplens' offline model: `--model toy`.
Its world is 12 kinds of object in 10 colours on 6 backgrounds. It knows nothing else.

## Training
- Config (`TrainConfig`): `{config}`
- Loss: CLIP's symmetric cross-entropy over the batch's N×N cosine matrix times a learned
  temperature (capped at 100).
- Held out: the (colour, object) pairs {held} never appear in any training image or caption.
- Run: {last.samples} samples in {last.seconds / 60:.1f} minutes of wall time on the 2-core machine that trained it.
- Loss {first.loss:.3f} → {last.loss:.3f}; batch diagonal accuracy {first.diagonal_accuracy:.3f} →
  {last.diagonal_accuracy:.3f}; temperature scale {last.logit_scale:.1f}. (A batch repeats captions such as
  "a red car", so its diagonal cannot reach 1.)

## Evaluation (`cliplens eval-toy --seed {report.seed}`)
```
{format_report(report)}
```
The toy world's captions do count ("two red cars") and do place objects ("to the left of"), yet the
probes show the contrastive model using counts but not word order, ignoring "not", and reading
written words: the same failures CLIP shows on web data.
"""
    (out / "eval.json").write_text(json.dumps(report.as_dict(), indent=1), encoding="utf-8")
    path = out / "README.md"
    path.write_text(card, encoding="utf-8")
    return path

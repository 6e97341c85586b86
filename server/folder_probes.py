"""Failure-mode probes on a folder of the user's images, which has no ground truth.

Each probe changes one thing (the number word, a "no", a mirror image, a painted word, a
sibling label) and measures how far the scores move, against how far they move between the
image's subject and other subjects: a change the model cannot see barely moves them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from .encoder import ClipEncoder
from .probes import DISPLAY_ROWS, NUMBER, ProbeOutcome, article, failure_texts, paint_word, plural


@dataclass
class FolderImage:
    name: str  # shown to the user
    picture: Image.Image
    vector: np.ndarray = field(default_factory=lambda: np.zeros(0))
    subject: str = ""
    margin: float = 0.0  # cos(subject caption) minus the mean cos of the other subjects' captions


def _photo(label: str) -> str:
    return f"a photo of {article(label)} {label}."


def prepare_folder(encoder: ClipEncoder, items: list[FolderImage], subject: str | None) -> list[str]:
    """Embed the images and give each its subject (the given one, or its best zero-shot label)
    and its subject margin, the yardstick every folder probe is measured against. Returns the vocabulary."""
    vocab = list(failure_texts()["subjects"])
    if subject is not None and subject not in vocab:
        vocab.append(subject)
    vecs = encoder.embed_images([it.picture for it in items]).astype(np.float64)
    cos = vecs @ encoder.embed_texts([_photo(v) for v in vocab]).astype(np.float64).T  # (N, V)
    for it, v, row in zip(items, vecs, cos, strict=True):
        s = subject if subject is not None else vocab[int(row.argmax())]
        others = [x for j, x in enumerate(row) if vocab[j] != s]
        it.vector, it.subject = v, s
        it.margin = float(row[vocab.index(s)] - np.mean(others))
    return vocab


def fill(template: str, subject: str) -> str:
    """The template's "{subject}" (or plural "{subjects}") filled in, "a" made "an" where needed."""
    template = template.replace("{subjects}", plural(subject))
    return template.replace("a {subject}", f"{article(subject)} {{subject}}").replace("{subject}", subject)


def _cos(encoder: ClipEncoder, vecs: np.ndarray, texts: list[str]) -> np.ndarray:
    return vecs @ encoder.embed_texts(texts).astype(np.float64).T


def yardstick(items: list[FolderImage]) -> float:
    """The median subject margin; a floor keeps the ratios finite when a given subject is not shown."""
    return max(float(np.median([it.margin for it in items])), 1e-3)


def _ratio(effects: list[float], items: list[FolderImage]) -> float:
    return round(float(np.median(effects)) / yardstick(items), 4)


@dataclass
class _Reading:
    captions: list[str]
    names: list[str]
    cosine: np.ndarray
    metric: str
    value: float  # for all but text_in_images, a ratio to the subject margin
    details: dict[str, float] = field(default_factory=dict)


def folder_probe(
    encoder: ClipEncoder,
    mode: str,
    items: list[FolderImage],
    vocab: list[str],
    labels: list[str] | None,
    word: str | None,
) -> ProbeOutcome:
    """One probe on a folder's images (already run through prepare_folder)."""
    if mode == "text_in_images":
        r = _folder_text(encoder, items, vocab, word)
        pull = r.details["pull_over_subject_margin"]
        low, mid, high = failure_texts()["modes"][mode]["folder_verdicts"]
        text = "overrides the picture" if r.value >= 0.5 else "flips some images" if r.value > 0 else None
        text = f"the written word {text}" if text else low if pull < 0.25 else mid if pull < 0.75 else high
    else:
        r = FOLDER_READINGS[mode](encoder, items, labels)
        low, mid, high = failure_texts()["modes"][mode]["folder_verdicts"]
        text = low if r.value < 0.25 else mid if r.value < 0.75 else high
    r.details["median_subject_margin"] = round(yardstick(items), 6)
    texts = failure_texts()["modes"][mode]
    return ProbeOutcome(
        mode, r.captions, r.names, r.cosine, r.metric, r.value, None, len(items), text, texts["reason"],
        texts["folder"], details=r.details,
    )  # fmt: skip


def _subject_rows(encoder: ClipEncoder, items: list[FolderImage], templates: list[str]) -> np.ndarray:
    """(N, T): each image against the templates filled with its own subject."""
    return np.stack([_cos(encoder, it.vector[None], [fill(t, it.subject) for t in templates])[0] for it in items])


def _named(items: list[FolderImage]) -> list[str]:
    return [f"{it.name} (subject: {it.subject})" for it in items[:DISPLAY_ROWS]]


def _folder_counting(encoder: ClipEncoder, items: list[FolderImage], labels: list[str] | None) -> _Reading:
    templates = ["a photo of one {subject}."] + [f"a photo of {NUMBER[n]} {{subjects}}." for n in (2, 3, 4)]
    cos = _subject_rows(encoder, items, templates)
    ratio = _ratio(list(cos.max(axis=1) - cos.min(axis=1)), items)
    return _Reading(templates, _named(items), cos[:DISPLAY_ROWS], "count_spread_over_subject_margin", ratio)


def _folder_negation(encoder: ClipEncoder, items: list[FolderImage], labels: list[str] | None) -> _Reading:
    templates = ["a photo of a {subject}.", "a photo with no {subject}.", "a photo without a {subject}."]
    cos = _subject_rows(encoder, items, templates)
    ratio = _ratio(list(cos[:, 0] - cos[:, 1:].mean(axis=1)), items)
    return _Reading(templates, _named(items), cos[:DISPLAY_ROWS], "negation_drop_over_subject_margin", ratio)


def _folder_spatial(encoder: ClipEncoder, items: list[FolderImage], labels: list[str] | None) -> _Reading:
    templates = ["a photo of a {subject} on the left.", "a photo of a {subject} on the right."]
    mirrored = encoder.embed_images([ImageOps.mirror(it.picture) for it in items]).astype(np.float64)
    flips = [
        FolderImage(f"{it.name}, mirrored", it.picture, m, it.subject) for it, m in zip(items, mirrored, strict=True)
    ]
    cos, cos_m = _subject_rows(encoder, items, templates), _subject_rows(encoder, flips, templates)
    shifts = np.abs((cos[:, 0] - cos[:, 1]) - (cos_m[:, 0] - cos_m[:, 1]))
    half = DISPLAY_ROWS // 2
    names = [n for pair in zip(_named(items)[:half], (f.name for f in flips[:half]), strict=True) for n in pair]
    matrix = np.stack([row for pair in zip(cos[:half], cos_m[:half], strict=True) for row in pair])
    return _Reading(templates, names, matrix, "mirror_shift_over_subject_margin", _ratio(list(shifts), items))


def _folder_text(encoder: ClipEncoder, items: list[FolderImage], vocab: list[str], word: str | None) -> _Reading:
    vecs = np.stack([it.vector for it in items])
    if word is None:  # the subject the images look least like: any pull towards it comes from the letters
        word = vocab[int(_cos(encoder, vecs, [_photo(v) for v in vocab]).mean(axis=0).argmin())]
    labels = vocab if word in vocab else [*vocab, word]
    captions = [_photo(v) for v in labels]
    painted = encoder.embed_images([paint_word(it.picture, word) for it in items]).astype(np.float64)
    before, after = _cos(encoder, vecs, captions), _cos(encoder, painted, captions)
    w = labels.index(word)
    flipped = (after.argmax(axis=1) == w) & (before.argmax(axis=1) != w)
    subj = np.array([labels.index(it.subject) if it.subject in labels else w for it in items])
    rows = np.arange(len(items))
    pulls = (after[:, w] - after[rows, subj]) - (before[:, w] - before[rows, subj])
    half = DISPLAY_ROWS // 2
    names = [
        n for it in items[:half] for n in (f"{it.name} (subject: {it.subject})", f'{it.name} with "{word}" painted on')
    ]
    matrix = np.stack([row for k in range(min(half, len(items))) for row in (
        [before[k, subj[k]], before[k, w]], [after[k, subj[k]], after[k, w]])])  # fmt: skip
    details = {"pull_over_subject_margin": _ratio(list(pulls), items)}
    return _Reading(
        ["a photo of a {subject}.", _photo(word)], names, matrix, "flip_rate", round(float(flipped.mean()), 4), details
    )


def _folder_fine(encoder: ClipEncoder, items: list[FolderImage], labels: list[str] | None) -> _Reading:
    sets: dict[str, list[str]] = failure_texts()["fine_grained_sets"]
    vecs = np.stack([it.vector for it in items])
    if labels is None:
        common = Counter(it.subject for it in items).most_common(1)[0][0]
        if common not in sets:  # the set whose parent the images match best
            parents = list(sets)
            common = parents[int(_cos(encoder, vecs, [_photo(p) for p in parents]).mean(axis=0).argmax())]
        labels = sets[common]
    cos = _cos(encoder, vecs, [_photo(label) for label in labels])
    top2 = np.sort(cos, axis=1)[:, -2:]
    ratio = _ratio(list(top2[:, 1] - top2[:, 0]), items)
    details = {"chance_of_a_label": round(1 / len(labels), 4)}
    captions = [_photo(label) for label in labels]
    return _Reading(captions, _named(items), cos[:DISPLAY_ROWS], "sibling_margin_over_subject_margin", ratio, details)


FOLDER_READINGS = {
    "counting": _folder_counting,
    "negation": _folder_negation,
    "spatial": _folder_spatial,
    "fine_grained": _folder_fine,
}

"""Whether a search hit is a real match: the query's score judged against a null.

A cosine alone says little: 0.25 is a strong text-image match for one model and noise for
another, and even for one model it depends on the image (some pictures sit close to every
caption). So each candidate image x is judged against what words that say nothing reach on
the same image. With generic prompts p ("a photo.", "an image.", ...) the null query is the
real query with its positive text terms replaced by p (its images and subtracted terms kept,
so the null measures everything but the words), and

    bar(x) = max_p cos(q_p, x) + lead,   margin(x) = score(x) - bar(x),

a match being confident when margin(x) > 0. The generic prompts are themselves queries that
mean nothing in particular, so how far one of them stands out from the others on an image shows
how far a meaningless query can get by chance: `lead` is the largest such lead over the
candidates and a seeded sample of the searched images (the sample keeps the bar from resting on
a handful of candidates). Beating the best prompt alone is not enough where generic prompts mean
little to the model (the bundled toy model never saw "a photo."): on 300 toy scenes that let each
of ten nonsense queries ("hello world", "asdf") count 23 to 38 images as matches. With the lead,
on the 311-scene demo folder, the ten gave 0 confident hits at top_k 100 and 2 (from one query)
at top_k 8, while nine real queries kept 32 and 29 relevant confident hits. A query made only
of images has no
words to replace: its scores are judged against the collection instead, by how far they
stand above the query's scores over a seeded sample of the searched images (robustly: the
median plus COLLECTION_Z scaled median absolute deviations).
"""

from __future__ import annotations

import functools
import json
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Literal

import numpy as np

from .encoder import ClipEncoder
from .store import ImageStore

NullKind = Literal["generic_prompts", "collection_sample"]

COLLECTION_SAMPLE = 256  # images drawn to judge an image-only query
COLLECTION_MIN = 8  # fewer than this cannot show what an ordinary score is
COLLECTION_Z = 3.0  # robust standard deviations above the median that count as a match
COLLECTION_QUANTILE = 0.99  # or: above this share of the other sampled images
SAMPLE_SEED = 0  # the same collection gives the same bar on every call
_MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution is 0.6745 σ


@functools.cache
def null_prompts() -> tuple[str, ...]:
    """The generic prompts (prompts/null_prompts.json)."""
    package = (__package__ or "cliplens.server").rsplit(".", 1)[0] + ".prompts"  # cliplens.prompts
    data = json.loads(files(package).joinpath("null_prompts.json").read_text(encoding="utf-8"))
    prompts = data.get("prompts")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise RuntimeError("null_prompts.json: 'prompts' must be a non-empty list of non-blank strings")
    return tuple(prompts)


@dataclass(frozen=True)
class Null:
    kind: NullKind
    scores: np.ndarray  # (M,) the bar each candidate must clear
    lead: float = 0.0  # what a match must add over the best generic prompt on its image
    prompt_index: np.ndarray | None = None  # (M,) the generic prompt that scores best on each candidate
    sample_size: int = 0
    median: float = 0.0
    spread: float = 0.0  # robust σ of the sample's scores

    def describe(self, i: int) -> str:
        """What set candidate i's bar (scores[i]), in words."""
        if self.kind == "generic_prompts" and self.prompt_index is not None:
            prompt = null_prompts()[int(self.prompt_index[i])]
            return (
                f"of the generic prompts, {prompt!r} does best on the same image with "
                f"{self.scores[i] - self.lead:.3f}, and a match must beat it by {self.lead:.3f}, the most one "
                f"generic prompt stands out from the others on any of the {self.sample_size} candidate and "
                "sampled images here"
            )
        return (
            f"{COLLECTION_QUANTILE:.0%} of {self.sample_size} sampled images of this collection stay below, or "
            f"(whichever is lower) {COLLECTION_Z:g} robust standard deviations above their median "
            f"({self.median:.3f} + {COLLECTION_Z:g} × {self.spread:.3f})"
        )


# (collection id, folders) -> (collection size when drawn, paths, (R, D) unit vectors)
_SAMPLES: dict[tuple[str, tuple[str, ...]], tuple[int, list[str], np.ndarray]] = {}
_SAMPLES_KEPT = 8
_SAMPLES_LOCK = threading.Lock()
# A full sample is drawn again once the collection has grown or shrunk by this share; a sample
# that holds every image of its folders is drawn again at any change.
SAMPLE_REDRAW_CHANGE = 0.1


def _sample_is_current(drawn_at: int, size: int, count: int) -> bool:
    if size < COLLECTION_SAMPLE:  # every image of the folders: any change shows in it
        return count == drawn_at
    return abs(count - drawn_at) <= SAMPLE_REDRAW_CHANGE * drawn_at


def collection_sample(store: ImageStore, folders: Sequence[Path]) -> tuple[list[str], np.ndarray]:
    """A seeded sample of up to COLLECTION_SAMPLE stored images under `folders`: their paths and
    unit vectors (R, D). Drawing it reads every path there, so it is kept while the collection
    stays about the same size: a search during a large index does not read every path again for
    each batch written, and 256 images drawn from N or from 1.1 N tell the same story."""
    key = (str(store.collection_id), tuple(sorted(str(f) for f in folders)))
    count = store.count(max_age=5.0)
    with _SAMPLES_LOCK:
        cached = _SAMPLES.get(key)
    if cached is not None and _sample_is_current(cached[0], len(cached[1]), count):
        return cached[1], cached[2]
    paths = sorted({p for f in folders for p in store.entries_under(f)})
    sample = random.Random(SAMPLE_SEED).sample(paths, min(COLLECTION_SAMPLE, len(paths)))
    vectors = store.vectors_for(sample)
    names = [p for p in sample if p in vectors]
    matrix = np.stack([np.asarray(vectors[p], np.float64) for p in names]) if names else np.zeros((0, store.info.dim))
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    with _SAMPLES_LOCK:
        _SAMPLES.pop(key, None)
        while len(_SAMPLES) >= _SAMPLES_KEPT:
            _SAMPLES.pop(next(iter(_SAMPLES)))
        _SAMPLES[key] = (count, names, matrix)
    return names, matrix


def prompt_null(
    encoder: ClipEncoder,
    term_vectors: np.ndarray,
    weights: Sequence[float],
    replaced: Sequence[bool],
    candidates: np.ndarray,
    reference: np.ndarray,
) -> Null:
    """The generic-prompt null for (M, D) unit candidate vectors. `replaced` marks the terms
    (the positive text ones) that each generic prompt stands in for; the floor comes from the
    generic prompts' scores on the candidates and on `reference` (R, D), a sample of the
    collection, so it does not depend on how many candidates a search fetched."""
    w = np.asarray(weights, np.float64)
    mask = np.asarray(replaced, bool)
    prompts = encoder.embed_texts(list(null_prompts())).astype(np.float64)  # cached by the encoder
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    kept = w[~mask] @ term_vectors[~mask] if (~mask).any() else np.zeros(term_vectors.shape[1])
    nulls = kept[None, :] + w[mask].sum() * prompts  # (P, D)
    norms = np.linalg.norm(nulls, axis=1, keepdims=True)
    usable = norms[:, 0] > 1e-6  # a prompt that cancels the kept terms has no direction
    nulls = nulls[usable] / norms[usable]
    index = np.flatnonzero(usable)
    scores = candidates @ nulls.T  # (M, P')
    if not len(candidates) or not scores.size:
        return Null(kind="generic_prompts", scores=np.zeros(len(candidates)), prompt_index=np.zeros(0, int))
    pool = np.concatenate([scores, reference @ nulls.T])  # (M + R, P')
    lead = 0.0
    if pool.shape[1] >= 2:
        top2 = np.sort(pool, axis=1)[:, -2:]  # per image: the runner-up prompt's score and the best's
        lead = max(0.0, float((top2[:, 1] - top2[:, 0]).max()))
    return Null(
        kind="generic_prompts",
        scores=scores.max(axis=1) + lead,
        lead=lead,
        prompt_index=index[scores.argmax(axis=1)],
        sample_size=len(pool),
    )


def collection_null(
    store: ImageStore, folders: Sequence[Path], query: np.ndarray, candidates: Sequence[str], exclude: set[str]
) -> Null | None:
    """The collection null for the candidates at these paths; None when too few images are
    indexed under `folders` to say what an ordinary score is.

    A candidate's bar is the lower of two: the COLLECTION_QUANTILE of the query's scores over
    the sample without the candidate itself (so in a small folder a match must beat nearly
    every other image), and the sample's median plus COLLECTION_Z robust standard deviations
    (so in a large one every clear outlier counts, not only the top 1%).
    """
    sampled, vectors = collection_sample(store, folders)
    keep = [i for i, p in enumerate(sampled) if p not in exclude]
    if len(keep) < COLLECTION_MIN:
        return None
    names = [sampled[i] for i in keep]
    scores = vectors[keep] @ query
    median = float(np.median(scores))
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(scores - median)))
    outlier = median + COLLECTION_Z * spread
    position = {p: i for i, p in enumerate(names)}
    whole = float(np.quantile(scores, COLLECTION_QUANTILE))
    bars = []
    for path in candidates:
        own = position.get(path)
        top = whole if own is None else float(np.quantile(np.delete(scores, own), COLLECTION_QUANTILE))
        bars.append(min(top, outlier))
    return Null(
        kind="collection_sample",
        scores=np.asarray(bars, np.float64),
        sample_size=len(names),
        median=median,
        spread=spread,
    )

"""Whether a search hit is a real match: the query's score judged against a null.

A cosine alone says little: 0.25 is a strong text-image match for one model and noise for
another, and even for one model it depends on the image (some pictures sit close to every
caption). So each candidate image x is judged against what words that say nothing reach on
the same image. With generic prompts p ("a photo.", "an image.", ...) the null query is the
real query with its positive text terms replaced by p (its images and subtracted terms kept,
so the null measures everything but the words), and

    null(x) = max_p cos(q_p, x),   margin(x) = score(x) - null(x),

a match being confident when margin(x) > PROMPT_DELTA. A query made only of images has no
words to replace: its scores are judged against the collection instead, by how far they
stand above the query's scores over a seeded sample of the searched images (robustly: the
median plus COLLECTION_Z scaled median absolute deviations).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Literal

import numpy as np

from .encoder import ClipEncoder
from .store import ImageStore

NullKind = Literal["generic_prompts", "collection_sample"]

PROMPT_DELTA = 0.0  # cosine a hit must add over the best generic prompt (see the module's tests)
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
    delta: float  # margin(x) > delta is a confident match
    prompt_index: np.ndarray | None = None  # (M,) which generic prompt set each candidate's bar
    sample_size: int = 0
    median: float = 0.0
    spread: float = 0.0  # robust σ of the sample's scores

    def describe(self, i: int) -> str:
        """What set candidate i's bar (scores[i] + delta), in words."""
        if self.kind == "generic_prompts" and self.prompt_index is not None:
            return (
                f"generic prompts like {null_prompts()[int(self.prompt_index[i])]!r} reach {self.scores[i]:.3f} on "
                f"the same image, and a match must beat them by {self.delta:.3f} (the most one generic prompt "
                "beats the others by, by chance, on these images)"
            )
        return (
            f"{COLLECTION_QUANTILE:.0%} of {self.sample_size} sampled images of this collection stay below, or "
            f"(whichever is lower) {COLLECTION_Z:g} robust standard deviations above their median "
            f"({self.median:.3f} + {COLLECTION_Z:g} × {self.spread:.3f})"
        )


def prompt_null(
    encoder: ClipEncoder,
    term_vectors: np.ndarray,
    weights: Sequence[float],
    replaced: Sequence[bool],
    candidates: np.ndarray,
) -> Null:
    """The generic-prompt null for (M, D) unit candidate vectors. `replaced` marks the terms
    (the positive text ones) that each generic prompt stands in for."""
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
    best = scores.argmax(axis=1) if len(candidates) else np.zeros(0, int)
    return Null(
        kind="generic_prompts",
        scores=scores.max(axis=1) if len(candidates) else np.zeros(0),
        delta=_chance_margin(scores),
        prompt_index=index[best],
    )


def _chance_margin(scores: np.ndarray) -> float:
    """How far one generic prompt gets above all the others on some candidate: the margin a
    query that means nothing to the model reaches by chance, which a real match must beat."""
    if scores.shape[0] == 0 or scores.shape[1] < 2:
        return PROMPT_DELTA
    top2 = np.sort(scores, axis=1)[:, -2:]  # (M, 2): the runner-up and the best per candidate
    margins = top2[:, 1] - top2[:, 0]  # the winning prompt's lead over the rest, per candidate
    return max(PROMPT_DELTA, float(margins.max()))


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
    paths = sorted({p for f in folders for p in store.entries_under(f)} - exclude)
    sample = random.Random(SAMPLE_SEED).sample(paths, min(COLLECTION_SAMPLE, len(paths)))
    vectors = store.vectors_for(sample)
    if len(vectors) < COLLECTION_MIN:
        return None
    names = list(vectors)
    matrix = np.stack([np.asarray(vectors[p], np.float64) for p in names])
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    scores = matrix @ query
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
        delta=0.0,
        sample_size=len(names),
        median=median,
        spread=spread,
    )

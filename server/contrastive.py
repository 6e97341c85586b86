"""The contrastive lesson's arithmetic: the N×N matrix at a logit scale, the same matrix at
other scales (the temperature what-if), and the modality gap between the two towers' vectors.

Everything runs in float64 torch on (N, D) unit image and text vectors: rows are images,
columns captions, and the true pairs sit on the diagonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from .encoder import ProbabilityKind

DEFAULT_SCALES = (1.0, 10.0, 100.0)  # plus the model's own

Matrix = list[list[float]]


class ScaleWhatIf(BaseModel):
    scale: float = Field(description="The logit scale tried: logits = scale * cosine (+ the model's bias for SigLIP)")
    is_model_scale: bool = Field(description="Whether this is the model's own learned scale")
    image_to_text: Matrix = Field(description="Row softmax at this scale")
    text_to_image: Matrix = Field(description="Column softmax at this scale")
    sigmoid: Matrix | None = Field(description="SigLIP: σ(logit) per cell at this scale; None for CLIP")
    loss: float = Field(description="The model's own kind of loss at this scale")
    loss_image_to_text: float
    loss_text_to_image: float
    mean_diagonal_image_to_text: float = Field(description="Mean probability a row gives its true caption")
    mean_diagonal_text_to_image: float = Field(description="Mean probability a column gives its true image")
    mean_row_entropy: float = Field(description="Mean entropy of the rows of image_to_text, in nats")
    max_entropy: float = Field(description="log N: the entropy of a uniform row")
    mistake_share_of_loss: float = Field(
        description="Share of the loss from the mistakes: rows and columns whose top pick is wrong (CLIP), "
        "cells on the wrong side of 0.5 (SigLIP)"
    )
    reading: str


class ModalityGap(BaseModel):
    image_image: Matrix = Field(description="cos(image i, image j)")
    text_text: Matrix = Field(description="cos(caption i, caption j)")
    mean_image_image: float = Field(description="Mean off-diagonal image-image cosine")
    mean_text_text: float = Field(description="Mean off-diagonal caption-caption cosine")
    mean_matched: float = Field(description="Mean cosine of an image and its own caption")
    mean_unmatched: float = Field(description="Mean cosine of an image and another image's caption")
    centroid_distance: float = Field(description="Euclidean distance between the image and the caption centroids")
    reading: str


@dataclass(frozen=True)
class Lesson:
    cosine: torch.Tensor  # (N, N): rows images, columns captions
    logits: torch.Tensor  # (N, N): logit_scale * cosine (+ bias for SigLIP)
    image_to_text: torch.Tensor  # (N, N): softmax over each row
    text_to_image: torch.Tensor  # (N, N): softmax over each column
    diagonal_wins: list[bool]
    loss_image_to_text: float
    loss_text_to_image: float
    loss: float
    loss_kind: str


def similarity_lesson(
    image_vecs: np.ndarray, text_vecs: np.ndarray, scale: float, bias: float | None, kind: ProbabilityKind
) -> Lesson:
    """Every number of the lesson from (N, D) unit image and text vectors, in float64."""
    img = torch.from_numpy(image_vecs).double()
    txt = torch.from_numpy(text_vecs).double()
    cosine = img @ txt.T
    bias_term = (bias or 0.0) if kind == "sigmoid" else 0.0
    logits = cosine * scale + bias_term
    n = cosine.shape[0]
    target = torch.arange(n)
    loss_i2t = F.cross_entropy(logits, target)
    loss_t2i = F.cross_entropy(logits.T, target)
    if kind == "sigmoid":
        signs = 2 * torch.eye(n, dtype=logits.dtype) - 1  # +1 on true pairs, -1 elsewhere
        loss = -F.logsigmoid(signs * logits).sum() / n
        loss_kind = "sigmoid: -(1/N) Σ_ij log σ(z_ij · logit_ij), z = +1 on the diagonal, -1 off it"
    else:
        loss = (loss_i2t + loss_t2i) / 2
        loss_kind = "symmetric cross-entropy: mean of image→text and text→image"
    row_max = cosine.argmax(dim=1)
    col_max = cosine.argmax(dim=0)
    return Lesson(
        cosine=cosine,
        logits=logits,
        image_to_text=logits.softmax(dim=1),
        text_to_image=logits.softmax(dim=0),
        diagonal_wins=[bool(row_max[i] == i and col_max[i] == i) for i in range(n)],
        loss_image_to_text=float(loss_i2t),
        loss_text_to_image=float(loss_t2i),
        loss=float(loss),
        loss_kind=loss_kind,
    )


def rounded(t: torch.Tensor | np.ndarray, digits: int = 6) -> Matrix:
    return [[round(float(v), digits) for v in row] for row in t]


def mean_off_diagonal(m: torch.Tensor | np.ndarray) -> float:
    """The mean of an (N, N) matrix's cells off its diagonal: the mismatched pairs."""
    n = m.shape[0]
    return float((m.sum() - m.diagonal().sum()) / (n * (n - 1)))


def _softmax_reading(w: ScaleWhatIf, n: int, wrong: int) -> str:
    head = f"At scale {w.scale:g}{' (the model’s own)' if w.is_model_scale else ''}"
    ratio = w.mean_row_entropy / w.max_entropy
    if ratio >= 0.9:
        near = w.loss >= 0.8 * w.max_entropy
        return (
            f"{head} the rows are nearly uniform: mean entropy {w.mean_row_entropy:.3f} nats of a possible "
            f"log N = {w.max_entropy:.3f}, the true caption gets {w.mean_diagonal_image_to_text:.3f} on average "
            f"(uniform: {1 / n:.3f}), and the loss is {w.loss:.3f}"
            + (", close to log N: right and wrong barely differ." if near else ", still below log N.")
        )
    if ratio <= 0.2 and wrong:
        return (
            f"{head} the rows are nearly one-hot (mean entropy {w.mean_row_entropy:.3f} nats): the {wrong} "
            f"rows and columns whose top pick is wrong carry {w.mistake_share_of_loss:.0%} of the loss "
            f"{w.loss:.3f}; a confident mistake costs about scale × its cosine gap, so the mistakes dominate."
        )
    if ratio <= 0.2:
        return (
            f"{head} the rows are nearly one-hot (mean entropy {w.mean_row_entropy:.3f} nats) and every row and "
            f"column picks its true partner, so the loss {w.loss:.3f} falls toward 0 as the scale grows."
        )
    return (
        f"{head} the rows are peaked but not one-hot: mean entropy {w.mean_row_entropy:.3f} of "
        f"{w.max_entropy:.3f} nats, the true caption gets {w.mean_diagonal_image_to_text:.3f} on average, "
        f"loss {w.loss:.3f}, {w.mistake_share_of_loss:.0%} of it from the {wrong} wrong rows and columns."
    )


def temperature_what_if(
    image_vecs: np.ndarray,
    text_vecs: np.ndarray,
    scales: list[float],
    model_scale: float,
    bias: float | None,
    kind: ProbabilityKind,
) -> list[ScaleWhatIf]:
    """The lesson's numbers at each scale; the cosines, and so every row's winner, do not change."""
    out = []
    for scale in scales:
        lesson = similarity_lesson(image_vecs, text_vecs, scale, bias, kind)
        n = lesson.cosine.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        i2t, t2i = lesson.image_to_text, lesson.text_to_image
        entropy = -(i2t * i2t.clamp_min(1e-300).log()).sum(dim=1)
        sig = torch.sigmoid(lesson.logits) if kind == "sigmoid" else None
        if sig is not None:
            cell_loss = -F.logsigmoid(torch.where(eye, lesson.logits, -lesson.logits))
            wrong_cells = torch.where(eye, sig < 0.5, sig > 0.5)
            wrong = int(wrong_cells.sum())
            share = float(cell_loss[wrong_cells].sum() / cell_loss.sum())
        else:
            # Per-row and per-column cross-entropy: -log of the true pair's probability.
            row_ce, col_ce = -i2t.diagonal().clamp_min(1e-300).log(), -t2i.diagonal().clamp_min(1e-300).log()
            row_wrong = lesson.cosine.argmax(dim=1) != torch.arange(n)
            col_wrong = lesson.cosine.argmax(dim=0) != torch.arange(n)
            wrong = int(row_wrong.sum() + col_wrong.sum())
            total = row_ce.sum() + col_ce.sum()
            share = float((row_ce[row_wrong].sum() + col_ce[col_wrong].sum()) / total) if total > 0 else 0.0
        what_if = ScaleWhatIf(
            scale=scale,
            is_model_scale=math.isclose(scale, model_scale, rel_tol=1e-3),
            image_to_text=rounded(i2t),
            text_to_image=rounded(t2i),
            sigmoid=None if sig is None else rounded(sig),
            loss=lesson.loss,
            loss_image_to_text=lesson.loss_image_to_text,
            loss_text_to_image=lesson.loss_text_to_image,
            mean_diagonal_image_to_text=float(i2t.diagonal().mean()),
            mean_diagonal_text_to_image=float(t2i.diagonal().mean()),
            mean_row_entropy=float(entropy.mean()),
            max_entropy=math.log(n),
            mistake_share_of_loss=share,
            reading="",
        )
        if sig is not None:
            what_if.reading = (
                f"At scale {scale:g}{' (the model’s own)' if what_if.is_model_scale else ''}, bias held at "
                f"{bias or 0.0:+.2f}: true pairs get σ = {float(sig[eye].mean()):.3f} on average and wrong pairs "
                f"{float(sig[~eye].mean()):.3f}; the sigmoid loss is {lesson.loss:.3f}, {share:.0%} of it from "
                f"the {wrong} cells on the wrong side of 0.5."
            )
        else:
            what_if.reading = _softmax_reading(what_if, n, wrong)
        out.append(what_if)
    return out


def modality_gap(image_vecs: np.ndarray, text_vecs: np.ndarray) -> ModalityGap:
    img = torch.from_numpy(image_vecs).double()
    txt = torch.from_numpy(text_vecs).double()
    ii, tt, it = img @ img.T, txt @ txt.T, img @ txt.T
    mean_ii, mean_tt = mean_off_diagonal(ii), mean_off_diagonal(tt)
    matched, unmatched = float(it.diagonal().mean()), mean_off_diagonal(it)
    distance = float(torch.linalg.vector_norm(img.mean(dim=0) - txt.mean(dim=0)))
    within = min(mean_ii, mean_tt)
    measured = (
        f"Image-image cosines average {mean_ii:.3f} and caption-caption {mean_tt:.3f}; an image and its own caption "
        f"average {matched:.3f}, other images' captions {unmatched:.3f}; the centroids are {distance:.3f} apart."
    )
    if within - matched > 0.1:
        verdict = (
            " This model shows a modality gap: images resemble other images, and captions other captions, more "
            "than any image resembles even its own caption, so the two sit in separate regions of the space."
        )
    elif matched - within > 0.1:
        verdict = (
            " This model shows no modality gap: an image is closer to its own caption than to other images, "
            "so images and captions are mixed in one region, grouped by meaning rather than by modality."
        )
    else:
        verdict = " This model shows no clear modality gap: matched pairs are about as close as same-modality pairs."
    if matched > unmatched:
        verdict += (
            f" Ranking still works because it compares captions for one image with each other: only the "
            f"difference matched − unmatched = {matched - unmatched:.3f} matters, not the absolute level."
        )
    else:
        verdict += " Matched pairs are no closer than unmatched ones: this model does not align these pairs."
    context = " (For scale: released CLIP models put image-text cosines near 0.2–0.3, image-image far higher.)"
    return ModalityGap(
        image_image=rounded(ii),
        text_text=rounded(tt),
        mean_image_image=mean_ii,
        mean_text_text=mean_tt,
        mean_matched=matched,
        mean_unmatched=unmatched,
        centroid_distance=distance,
        reading=measured + verdict + context,
    )


def default_scales(model_scale: float) -> list[float]:
    extra = [s for s in DEFAULT_SCALES if not math.isclose(s, model_scale, rel_tol=1e-3)]
    return sorted([*extra, model_scale])

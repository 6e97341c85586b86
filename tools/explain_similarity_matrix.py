"""explain_similarity_matrix: the N×N image-caption matrix that CLIP is trained on, worked out.

For N images and their N captions, cell (i, j) is cosine(image i, caption j). Training
pushes the diagonal (the true pairs) up and everything else down: CLIP with a softmax
cross-entropy over each row and each column, SigLIP with an independent sigmoid per cell.

Two what-ifs ride along: the same matrix at other logit scales (temperature decides how
peaked the probabilities are, never which caption wins), and the modality gap (images sit
near images and captions near captions, whatever they show).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field, field_validator, model_validator

from ..server.encoder import ClipEncoder, ProbabilityKind
from ..server.images import load_pictures
from ..server.paths import MAX_SHOWN_PATH, PathPolicy, shown
from ..server.render import heatmap_png, heatmap_strip_png, joint_heatmap_png
from ._mcp import engine, image_block, parse, run_core, tool_result

MIN_PAIRS, MAX_PAIRS = 2, 16
MAX_CAPTION_CHARS = 300
MIN_SCALE, MAX_SCALE = 0.01, 1000.0
MAX_SCALES = 6
DEFAULT_SCALES = (1.0, 10.0, 100.0)  # plus the model's own

Images = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=4096)]],
    Field(min_length=MIN_PAIRS, max_length=MAX_PAIRS, description=f"{MIN_PAIRS} to {MAX_PAIRS} image paths"),
]
Captions = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_CAPTION_CHARS)]],
    Field(min_length=MIN_PAIRS, max_length=MAX_PAIRS, description="One caption per image, in the same order"),
]
Scales = Annotated[
    list[Annotated[float, Field(ge=MIN_SCALE, le=MAX_SCALE, allow_inf_nan=False)]] | None,
    Field(
        min_length=1,
        max_length=MAX_SCALES,
        description=f"Logit scales for the temperature what-if, {MIN_SCALE:g} to {MAX_SCALE:g}, distinct; "
        "default: 1, 10, the model's own and 100",
    ),
]

Matrix = list[list[float]]


class ExplainInput(BaseModel):
    images: Images
    captions: Captions
    scales: Scales = None

    @field_validator("scales")
    @classmethod
    def _distinct(cls, scales: list[float] | None) -> list[float] | None:
        repeated = sorted({s for s in scales or [] if (scales or []).count(s) > 1})
        if repeated:
            raise ValueError(f"scales must be distinct; repeated: {repeated}")
        return scales

    @model_validator(mode="after")
    def _paired(self) -> ExplainInput:
        if len(self.images) != len(self.captions):
            raise ValueError(
                f"got {len(self.images)} images and {len(self.captions)} captions: "
                "they are pairs, so give one caption per image, in order"
            )
        return self


class RowReading(BaseModel):
    image_index: int
    best_caption_index: int
    correct: bool = Field(description="Whether the image's own caption wins its row")
    margin: float = Field(description="Cosine of the winner minus the runner-up")
    text: str


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


class ExplainResult(BaseModel):
    n: int
    captions: list[str]
    images: list[str] = Field(description="Image paths (data from disk, never instructions)")
    cosine: Matrix = Field(description="cosine[i][j] = cos(image i, caption j)")
    logit_scale: float = Field(description="exp(learned temperature): logits = logit_scale * cosine (+ bias)")
    logit_bias: float | None = Field(description="SigLIP's learned bias; None for CLIP")
    logits: Matrix
    image_to_text: Matrix = Field(description="Softmax of each row: which caption each image picks")
    text_to_image: Matrix = Field(description="Softmax of each column, same layout: which image each caption picks")
    diagonal_wins: list[bool] = Field(description="Cell (i, i) is the maximum of row i and of column i")
    loss_image_to_text: float = Field(description="Cross-entropy of the rows against the diagonal")
    loss_text_to_image: float = Field(description="Cross-entropy of the columns against the diagonal")
    loss: float = Field(description="CLIP: mean of the two; SigLIP: its sigmoid loss")
    loss_kind: str
    probability: ProbabilityKind
    readings: list[RowReading]
    temperature_what_if: list[ScaleWhatIf] = Field(description="The same cosines at other logit scales")
    modality_gap: ModalityGap
    model: str


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


def _reading(i: int, row: torch.Tensor) -> RowReading:
    order = torch.argsort(row, descending=True)
    best, runner = int(order[0]), int(order[1])
    margin = float(row[best] - row[runner])
    if best == i:
        text = f"Image {i + 1} picks its own caption T{i + 1}, ahead of T{runner + 1} by {margin:.3f} cosine."
    else:
        gap = float(row[best] - row[i])
        text = f"Image {i + 1} prefers caption T{best + 1} over its own T{i + 1} by {gap:.3f} cosine: a miss."
    return RowReading(image_index=i, best_caption_index=best, correct=best == i, margin=round(margin, 6), text=text)


def _rounded(t: torch.Tensor) -> Matrix:
    return [[round(float(v), 6) for v in row] for row in t]


def _mean_off_diagonal(m: torch.Tensor) -> float:
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
            image_to_text=_rounded(i2t),
            text_to_image=_rounded(t2i),
            sigmoid=None if sig is None else _rounded(sig),
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
    mean_ii, mean_tt = _mean_off_diagonal(ii), _mean_off_diagonal(tt)
    matched, unmatched = float(it.diagonal().mean()), _mean_off_diagonal(it)
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
        image_image=_rounded(ii),
        text_text=_rounded(tt),
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


def explain_similarity_matrix(encoder: ClipEncoder, policy: PathPolicy, request: ExplainInput) -> ExplainResult:
    paths = [policy.resolve(raw, want="file") for raw in request.images]
    image_vecs = encoder.embed_images(load_pictures(paths, policy.roots))  # (N, D)
    text_vecs = encoder.embed_texts(request.captions)  # (N, D)
    scale, bias, kind = encoder.logit_scale, encoder.logit_bias, encoder.probability
    lesson = similarity_lesson(image_vecs, text_vecs, scale, bias, kind)
    scales = request.scales or default_scales(scale)
    return ExplainResult(
        n=len(paths),
        captions=request.captions,
        images=[shown(str(p), MAX_SHOWN_PATH) for p in paths],
        cosine=_rounded(lesson.cosine),
        logit_scale=encoder.logit_scale,
        logit_bias=encoder.logit_bias,
        logits=_rounded(lesson.logits),
        image_to_text=_rounded(lesson.image_to_text),
        text_to_image=_rounded(lesson.text_to_image),
        diagonal_wins=lesson.diagonal_wins,
        loss_image_to_text=lesson.loss_image_to_text,
        loss_text_to_image=lesson.loss_text_to_image,
        loss=lesson.loss,
        loss_kind=lesson.loss_kind,
        probability=encoder.probability,
        readings=[_reading(i, lesson.cosine[i]) for i in range(len(paths))],
        temperature_what_if=temperature_what_if(image_vecs, text_vecs, scales, scale, bias, kind),
        modality_gap=modality_gap(image_vecs, text_vecs),
        model=encoder.info.model_id,
    )


def pictures(result: ExplainResult) -> list[bytes]:
    """PNGs: the cosine heatmap, the what-if strip (one probability matrix per scale), the joint matrix."""
    legend = [
        f"I{i + 1} = {Path(image).name}   T{i + 1} = {caption}"
        for i, (image, caption) in enumerate(zip(result.images, result.captions, strict=True))
    ]
    cosine = heatmap_png(
        np.array(result.cosine), title="cosine(image i, caption j); true pairs outlined", legend=legend
    )
    sigmoid = result.probability == "sigmoid"
    strip = heatmap_strip_png(
        [
            np.array(w.sigmoid if sigmoid and w.sigmoid is not None else w.image_to_text)
            for w in result.temperature_what_if
        ],
        [
            f"scale {w.scale:g}{' (model)' if w.is_model_scale else ''}: loss {w.loss:.3f}"
            for w in result.temperature_what_if
        ],
        value_range=(0.0, 1.0),
        title="sigmoid(scale*cosine + bias) per cell at each scale"
        if sigmoid
        else "row softmax (image->text) at each scale",
    )
    gap = result.modality_gap
    means = f"image-image {gap.mean_image_image:.3f}, caption-caption {gap.mean_text_text:.3f}"
    pairs = f"matched {gap.mean_matched:.3f}, unmatched {gap.mean_unmatched:.3f}"
    joint = joint_heatmap_png(
        np.array(gap.image_image), np.array(result.cosine), np.array(gap.text_text), legend=[f"mean {means}, {pairs}"]
    )
    return [cosine, strip, joint]


DESCRIPTION = (
    "Show CLIP's N×N image-caption similarity matrix for paired images and captions: cosines, "
    "logits, both softmaxes, the contrastive loss, the same matrix at other logit scales (temperature "
    "what-if), the modality gap between image and caption embeddings, and heatmaps of each."
)


async def handle(
    images: Images, captions: Captions, ctx: Context, scales: Scales = None
) -> Annotated[CallToolResult, ExplainResult]:
    app = engine(ctx)
    request = parse(ExplainInput, images=images, captions=captions, scales=scales)
    result = await run_core(explain_similarity_matrix, app.encoder, app.policy, request)
    pngs = await run_core(pictures, result)
    return tool_result(result, [image_block(png, "image/png") for png in pngs])


ANNOTATIONS = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

"""explain_similarity_matrix: the N×N image-caption matrix that CLIP is trained on, worked out.

For N images and their N captions, cell (i, j) is cosine(image i, caption j). Training
pushes the diagonal (the true pairs) up and everything else down: CLIP with a softmax
cross-entropy over each row and each column, SigLIP with an independent sigmoid per cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field, model_validator

from ..server.encoder import ClipEncoder, ProbabilityKind
from ..server.images import load_pictures
from ..server.paths import MAX_SHOWN_PATH, PathPolicy, shown
from ..server.render import heatmap_png
from ._mcp import engine, image_block, parse, run_core, tool_result

MIN_PAIRS, MAX_PAIRS = 2, 16
MAX_CAPTION_CHARS = 300

Images = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=4096)]],
    Field(min_length=MIN_PAIRS, max_length=MAX_PAIRS, description=f"{MIN_PAIRS} to {MAX_PAIRS} image paths"),
]
Captions = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_CAPTION_CHARS)]],
    Field(min_length=MIN_PAIRS, max_length=MAX_PAIRS, description="One caption per image, in the same order"),
]

Matrix = list[list[float]]


class ExplainInput(BaseModel):
    images: Images
    captions: Captions

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


def explain_similarity_matrix(encoder: ClipEncoder, policy: PathPolicy, request: ExplainInput) -> ExplainResult:
    paths = [policy.resolve(raw, want="file") for raw in request.images]
    image_vecs = encoder.embed_images(load_pictures(paths, policy.roots))  # (N, D)
    text_vecs = encoder.embed_texts(request.captions)  # (N, D)
    lesson = similarity_lesson(image_vecs, text_vecs, encoder.logit_scale, encoder.logit_bias, encoder.probability)
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
        model=encoder.info.model_id,
    )


DESCRIPTION = (
    "Show CLIP's N×N image-caption similarity matrix for paired images and captions: cosines, "
    "logits, both softmaxes, the contrastive loss, and a heatmap."
)


async def handle(images: Images, captions: Captions, ctx: Context) -> Annotated[CallToolResult, ExplainResult]:
    app = engine(ctx)
    request = parse(ExplainInput, images=images, captions=captions)
    result = await run_core(explain_similarity_matrix, app.encoder, app.policy, request)
    png = await run_core(heatmap_png, np.array(result.cosine))
    return tool_result(result, [image_block(png, "image/png")])


ANNOTATIONS = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

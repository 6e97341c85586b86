"""explain_similarity_matrix: the N×N image-caption matrix that CLIP is trained on, worked out.

For N images and their N captions, cell (i, j) is cosine(image i, caption j). Training
pushes the diagonal (the true pairs) up and everything else down: CLIP with a softmax
cross-entropy over each row and each column, SigLIP with an independent sigmoid per cell.

Two what-ifs ride along: the same matrix at other logit scales (temperature decides how
peaked the probabilities are, never which caption wins), and the modality gap (images sit
near images and captions near captions, whatever they show).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field, field_validator, model_validator

from ..server.contrastive import (
    Matrix,
    ModalityGap,
    ScaleWhatIf,
    default_scales,
    modality_gap,
    rounded,
    similarity_lesson,
    temperature_what_if,
)
from ..server.encoder import ClipEncoder, ProbabilityKind
from ..server.images import load_pictures
from ..server.paths import MAX_SHOWN_PATH, PathPolicy, shown
from ..server.render import heatmap_png, heatmap_strip_png, joint_heatmap_png
from ._mcp import engine, image_block, parse, run_core, tool_result

MIN_PAIRS, MAX_PAIRS = 2, 16
MAX_CAPTION_CHARS = 300
MIN_SCALE, MAX_SCALE = 0.01, 1000.0
MAX_SCALES = 6

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
        cosine=rounded(lesson.cosine),
        logit_scale=encoder.logit_scale,
        logit_bias=encoder.logit_bias,
        logits=rounded(lesson.logits),
        image_to_text=rounded(lesson.image_to_text),
        text_to_image=rounded(lesson.text_to_image),
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

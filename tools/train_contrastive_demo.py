"""train_contrastive_demo: watch a fresh, small CLIP learn N image-caption pairs in seconds.

The same loss the real model was trained with, on a batch you can read: N pairs, an N×N
matrix of cosines, cross-entropy over every row and every column. Snapshots of the matrix
show the diagonal lighting up as the true pairs win; the loss curve shows the price falling.
The model trained here is thrown away: it is the server's own model that search uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field, model_validator

from ..server.contrastive import Matrix, mean_off_diagonal, rounded
from ..server.images import load_pictures
from ..server.minitrain import (
    DemoRun,
    Snapshot,
    loss_curve_png,
    loss_text,
    matrix_strip_png,
    toy_pairs,
    train_pairs,
)
from ..server.paths import MAX_SHOWN_PATH, PathPolicy, shown
from ._mcp import check_cancelled, engine, image_block, parse, progress_reporter, run_core, tool_result

MIN_PAIRS, MAX_PAIRS = 2, 8
MAX_CAPTION_CHARS = 300
MAX_STEPS = 400
MAX_SECONDS = 30.0
SNAPSHOTS = 6
PROGRESS_EVERY = 10

Images = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=4096)]] | None,
    Field(
        min_length=MIN_PAIRS,
        max_length=MAX_PAIRS,
        description=f"{MIN_PAIRS} to {MAX_PAIRS} image paths (inside --allow); omit both for 5 toy-world pairs",
    ),
]
Captions = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_CAPTION_CHARS)]] | None,
    Field(min_length=MIN_PAIRS, max_length=MAX_PAIRS, description="One caption per image, in the same order"),
]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS, description=f"Training steps (full batch), 1 to {MAX_STEPS}")]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1, description="Seed of the fresh model's weights")]
LearningRate = Annotated[float, Field(ge=1e-5, le=0.05, description="AdamW learning rate, 1e-5 to 0.05")]
MaxSeconds = Annotated[
    float,
    Field(ge=1.0, le=MAX_SECONDS, description=f"Wall-clock cap on the training loop, 1 to {MAX_SECONDS:g} seconds"),
]


class TrainDemoInput(BaseModel):
    images: Images = None
    captions: Captions = None
    steps: Steps = 60
    seed: Seed = 0
    learning_rate: LearningRate = 1e-3
    max_seconds: MaxSeconds = 10.0

    @model_validator(mode="after")
    def _paired(self) -> TrainDemoInput:
        if self.images is not None and self.captions is None:
            raise ValueError(
                f"got {len(self.images)} images and no captions: give one caption per image, "
                "or neither for the toy-world pairs"
            )
        if self.captions is not None and self.images is None:
            raise ValueError(
                f"got {len(self.captions)} captions and no images: give one image per caption, "
                "or neither for the toy-world pairs"
            )
        if self.images is not None and self.captions is not None and len(self.images) != len(self.captions):
            raise ValueError(
                f"got {len(self.images)} images and {len(self.captions)} captions: "
                "they are pairs, so give one caption per image, in order"
            )
        return self


class Pair(BaseModel):
    index: int
    image: str = Field(description="The image path, or the toy-world scene (data, never instructions)")
    caption: str


class SnapshotOut(BaseModel):
    step: int = Field(description="Updates applied before this picture of the matrix (0: untrained)")
    loss: float
    diagonal_accuracy: float = Field(description="Share of rows and columns whose own pair has the highest logit")
    logit_scale: float = Field(description="exp(learned temperature): logits = logit_scale * cosine")
    diagonal_mean: float = Field(description="Mean cosine of the true pairs")
    off_diagonal_mean: float = Field(description="Mean cosine of the mismatched pairs")
    cosine: Matrix = Field(description="cosine[i][j] = cos(image i, caption j)")
    logits: Matrix


class ModelConfigOut(BaseModel):
    width: int
    vision_layers: int
    text_layers: int
    heads: int
    projection_dim: int
    image_size: int
    context: int = Field(description="Caption tokens kept; longer captions are cut")
    parameters: int
    learning_rate: float
    optimizer: str
    seed: int


class TrainDemoResult(BaseModel):
    source: Literal["toy_world", "user"]
    pairs: list[Pair]
    steps_requested: int
    steps_run: int
    seconds: float
    stopped_by: Literal["steps", "time"] = Field(description="steps: all steps ran; time: max_seconds cut the run")
    chance_loss: float = Field(description="ln N: the loss of a model that cannot tell the pairs apart")
    snapshots: list[SnapshotOut]
    loss_curve: list[float] = Field(description="loss_curve[k]: the loss after k updates")
    accuracy_curve: list[float] = Field(description="accuracy_curve[k]: the diagonal accuracy after k updates")
    final_loss: float
    final_diagonal_accuracy: float
    lesson: str
    config: ModelConfigOut


def _means(cosine: np.ndarray) -> tuple[float, float]:
    """(mean cosine of the true pairs, of the mismatched ones)."""
    return float(np.trace(cosine) / cosine.shape[0]), mean_off_diagonal(cosine)


def _snapshot_out(snap: Snapshot) -> SnapshotOut:
    diag, off = _means(snap.cosine)
    return SnapshotOut(
        step=snap.step,
        loss=round(snap.loss, 6),
        diagonal_accuracy=snap.diagonal_accuracy,
        logit_scale=round(snap.logit_scale, 4),
        diagonal_mean=round(diag, 5),
        off_diagonal_mean=round(off, 5),
        cosine=rounded(snap.cosine, 5),
        logits=rounded(snap.logits, 5),
    )


def lesson_text(run: DemoRun, captions: list[str], learning_rate: float) -> str:
    """What the numbers of this run say, in a few sentences; captions are named by index only."""
    first, last = run.snapshots[0], run.snapshots[-1]
    n = first.cosine.shape[0]
    (d0, o0), (d1, o1) = _means(first.cosine), _means(last.cosine)
    parts = [
        f"A fresh CLIP ({run.parameters:,} parameters) trained {run.steps_run} steps in {run.seconds:.1f} s "
        f"on these {n} pairs. The loss went from {loss_text(first.loss)} to {loss_text(last.loss)} "
        f"(ln {n} = {math.log(n):.3f} is what a model that cannot tell the pairs apart scores).",
        f"The true pairs' mean cosine went from {d0:.3f} to {d1:.3f} and the mismatched pairs' from {o0:.3f} "
        f"to {o1:.3f}: each step pulls an image towards its own caption and pushes it from the other {n - 1}.",
    ]
    if last.diagonal_accuracy == 1.0:
        since = next(k for k in range(len(run.accuracy_curve)) if min(run.accuracy_curve[k:]) == 1.0)
        parts.append(
            f"From step {since} on, every image picked its own caption and every caption its own image "
            "(diagonal accuracy 1.0)."
        )
    else:
        rows = last.logits.argmax(axis=1)
        misses = [f"image {i + 1} picks caption {int(j) + 1}" for i, j in enumerate(rows) if j != i]
        parts.append(
            f"At the end the diagonal accuracy is {last.diagonal_accuracy:.2f}"
            + (f": {'; '.join(misses)}." if misses else " (some captions still pick the wrong image).")
            + " More steps or a higher learning rate would go further."
        )
    scale_change = math.log(last.logit_scale / first.logit_scale)
    if abs(scale_change) < 0.1:
        parts.append(
            f"The learned temperature barely moved ({first.logit_scale:.2f} to {last.logit_scale:.2f}): Adam moves "
            f"its logarithm by at most about the learning rate per step ({run.steps_run} × {learning_rate:g} = "
            f"{run.steps_run * learning_rate:.2f} here), so the rows sharpened through the cosines instead."
        )
    else:
        parts.append(
            f"The learned temperature went from {first.logit_scale:.2f} to {last.logit_scale:.2f}; the logits "
            "are it times the cosines, so a larger value makes each row's softmax sharper."
        )
    repeats = sorted({c for c in captions if captions.count(c) > 1})
    if repeats:
        same = [[i + 1 for i, c in enumerate(captions) if c == r] for r in repeats]
        parts.append(
            f"Captions {', '.join('/'.join(map(str, g)) for g in same)} are the same text, so no model can tell "
            "those pairs apart: in CLIP's batch they count as wrong answers for each other."
        )
    if run.stopped_by == "time":
        parts.append(f"The run hit the wall-clock cap after {run.steps_run} steps.")
    parts.append(f"This model has seen only these {n} pairs: it memorised them and would not understand a new caption.")
    return " ".join(parts)


def train_contrastive_demo(
    policy: PathPolicy, request: TrainDemoInput, on_step: Callable[[int, int], None] | None = None
) -> tuple[TrainDemoResult, bytes, bytes]:
    """The result and two PNGs: the matrix snapshots side by side, and the loss curve."""
    if request.images is None or request.captions is None:
        pictures, captions, names = toy_pairs()
        labels = names
        source: Literal["toy_world", "user"] = "toy_world"
    else:
        paths = [policy.resolve(raw, want="file") for raw in request.images]
        pictures = load_pictures(paths, policy.roots)
        captions = list(request.captions)
        names = [shown(str(p), MAX_SHOWN_PATH) for p in paths]
        labels = [shown(Path(p).name, 60) for p in paths]
        source = "user"
    run = train_pairs(
        pictures,
        captions,
        steps=request.steps,
        seed=request.seed,
        learning_rate=request.learning_rate,
        max_seconds=request.max_seconds,
        snapshots=SNAPSHOTS,
        on_step=on_step,
    )
    cfg = run.config
    n = len(captions)
    result = TrainDemoResult(
        source=source,
        pairs=[Pair(index=i, image=name, caption=c) for i, (name, c) in enumerate(zip(names, captions, strict=True))],
        steps_requested=request.steps,
        steps_run=run.steps_run,
        seconds=round(run.seconds, 3),
        stopped_by="time" if run.stopped_by == "time" else "steps",
        chance_loss=round(math.log(n), 6),
        snapshots=[_snapshot_out(s) for s in run.snapshots],
        loss_curve=[round(v, 6) for v in run.loss_curve],
        accuracy_curve=run.accuracy_curve,
        final_loss=round(run.loss_curve[-1], 6),
        final_diagonal_accuracy=run.accuracy_curve[-1],
        lesson=lesson_text(run, captions, request.learning_rate),
        config=ModelConfigOut(
            width=cfg.width,
            vision_layers=cfg.vision_layers,
            text_layers=cfg.text_layers,
            heads=cfg.heads,
            projection_dim=cfg.projection_dim,
            image_size=cfg.image_size,
            context=cfg.context,
            parameters=run.parameters,
            learning_rate=request.learning_rate,
            optimizer="AdamW, no weight decay, gradient norm clipped at 1, full batch",
            seed=request.seed,
        ),
    )
    strip = matrix_strip_png(run.snapshots, captions, labels)
    curve = loss_curve_png(run.loss_curve, [s.step for s in run.snapshots], chance=math.log(n))
    return result, strip, curve


DESCRIPTION = (
    "Train a fresh small CLIP for a few seconds on 2-8 image-caption pairs (default: 5 toy-world pairs) and "
    "watch the N×N similarity matrix's diagonal light up: matrix snapshots, loss curve, and the numbers."
)


async def handle(
    ctx: Context,
    images: Images = None,
    captions: Captions = None,
    steps: Steps = 60,
    seed: Seed = 0,
    learning_rate: LearningRate = 1e-3,
    max_seconds: MaxSeconds = 10.0,
) -> Annotated[CallToolResult, TrainDemoResult]:
    app = engine(ctx)
    request = parse(
        TrainDemoInput,
        images=images,
        captions=captions,
        steps=steps,
        seed=seed,
        learning_rate=learning_rate,
        max_seconds=max_seconds,
    )
    report = progress_reporter(ctx)

    def on_step(done: int, total: int) -> None:
        check_cancelled()
        if done % PROGRESS_EVERY == 0 or done == total:
            report(done, total, f"step {done} of {total}")

    result, strip, curve = await run_core(train_contrastive_demo, app.policy, request, on_step)
    return tool_result(result, [image_block(strip, "image/png"), image_block(curve, "image/png")])


ANNOTATIONS = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

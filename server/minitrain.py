"""Train a fresh, small CLIP on a handful of image-caption pairs, and draw what happened.

This is the lesson in miniature: the N×N batch matrix starts as noise, and the symmetric
cross-entropy pulls each image towards its own caption and away from the others until the
diagonal wins every row and column. The model here memorises N pairs; it learns nothing
that carries to new pictures, which is the point of the big runs it stands in for.

The run is seeded (its weights come from a forked RNG, so the process-wide torch RNG is
left as it was) and bounded twice: by the number of steps, and by a wall-clock cap so a
busy machine cannot make a call hang.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .render import font as text_font
from .render import to_png, viridis
from .toytrain import TrainConfig, build_model, clip_loss, diagonal_accuracy
from .toyworld import render, single_scene

# The five pairs of the README's lesson, drawn from a fixed seed so they are always the same pictures.
TOY_PAIRS = (("red", "bicycle"), ("blue", "car"), ("green", "tree"), ("yellow", "boat"), ("purple", "flower"))
TOY_SCENE_SEED = 7
DEMO_CONFIG = TrainConfig(
    width=64, vision_layers=2, text_layers=2, heads=4, projection_dim=64, image_size=64, context=32
)
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on exp(temperature), as toytrain clamps it
PATCH_SIZE = 8  # what toytrain.build_model uses

# One run at a time: build_model seeds the global torch RNG (two builds at once would interleave
# their draws), the processor is shared, and two runs on a small machine only slow each other.
_RUN_LOCK = threading.Lock()
LOCK_WAIT_SECONDS = 40.0  # longer than one capped run, so a second caller waits its turn
_processor: Any = None


@dataclass(frozen=True)
class Snapshot:
    step: int  # updates applied before this picture of the matrix
    loss: float
    diagonal_accuracy: float  # share of rows and columns whose own pair wins
    logit_scale: float
    cosine: np.ndarray  # (N, N): rows images, columns captions
    logits: np.ndarray  # (N, N): logit_scale * cosine


@dataclass
class DemoRun:
    snapshots: list[Snapshot]
    loss_curve: list[float]  # loss_curve[k]: the loss after k updates
    accuracy_curve: list[float]  # accuracy_curve[k]: the diagonal accuracy after k updates
    steps_run: int
    seconds: float
    stopped_by: str  # "steps" or "time"
    parameters: int
    config: TrainConfig = field(default_factory=lambda: DEMO_CONFIG)


def toy_pairs() -> tuple[list[Image.Image], list[str], list[str]]:
    """The default pairs: (pictures, captions, names), rendered in memory from the toy world."""
    rng = random.Random(TOY_SCENE_SEED)
    pictures = [render(single_scene(rng, colour, kind)) for colour, kind in TOY_PAIRS]
    captions = [f"a photo of a {colour} {kind}." for colour, kind in TOY_PAIRS]
    names = [f"toy world: {colour} {kind}" for colour, kind in TOY_PAIRS]
    return pictures, captions, names


def snapshot_steps(steps: int, count: int) -> list[int]:
    """`count` steps spread evenly from 0 to `steps`, both ends included."""
    if steps <= 0 or count <= 1:
        return [0, steps] if steps > 0 else [0]
    return sorted({round(k * steps / (count - 1)) for k in range(count)})


def load_processor() -> Any:
    """The bundled toy model's processor: its byte-level BPE tokenises any caption."""
    from transformers import CLIPProcessor

    from .encoder import TOY_MODEL_DIR

    return CLIPProcessor.from_pretrained(str(TOY_MODEL_DIR))


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Run this thread's torch ops on one core for the duration.

    The model is so small that a second thread buys little, and on a loaded machine OpenMP's
    spinning threads made a run 15 times slower (92 s against 6 s for 80 steps at load 6 on
    2 cores). With the OpenMP backend the setting is this thread's own: threads that have
    already run torch ops keep theirs (one that runs its first op during the window starts at 1).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_pairs(
    pictures: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    steps: int,
    seed: int,
    learning_rate: float,
    max_seconds: float,
    snapshots: int = 6,
    on_step: Callable[[int, int], None] | None = None,
) -> DemoRun:
    """Train a fresh small CLIP on exactly these pairs, full batch, and keep snapshots of the matrix.

    `on_step(done, steps)` is called after every update (progress and cancellation).
    """
    if not _RUN_LOCK.acquire(timeout=LOCK_WAIT_SECONDS):
        raise ValueError(f"another training demo has run for over {LOCK_WAIT_SECONDS:g} s; try again shortly")
    try:
        with _one_intra_op_thread():
            return _train(pictures, captions, steps, seed, learning_rate, max_seconds, snapshots, on_step)
    finally:
        _RUN_LOCK.release()


def _train(
    pictures: Sequence[Image.Image],
    captions: Sequence[str],
    steps: int,
    seed: int,
    learning_rate: float,
    max_seconds: float,
    snapshots: int,
    on_step: Callable[[int, int], None] | None,
) -> DemoRun:
    global _processor
    started = time.perf_counter()
    cfg = replace(DEMO_CONFIG, seed=seed, lr=learning_rate)
    if _processor is None:
        _processor = load_processor()
    processor = _processor
    tokenizer = processor.tokenizer
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, tokenizer)
    pixels = processor(images=list(pictures), return_tensors="pt")["pixel_values"]
    text = tokenizer(list(captions), padding=True, truncation=True, max_length=cfg.context, return_tensors="pt")
    # Plain AdamW without weight decay: a few dozen steps on N pairs, nothing to regularise.
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0, foreach=True)
    # The cap bounds the loop; loading the processor (once per process) and building the model
    # are bounded already and would otherwise eat a cold call's budget.
    loop_started = time.perf_counter()
    planned = set(snapshot_steps(steps, snapshots))
    taken: list[Snapshot] = []
    curve: list[float] = []
    accuracy: list[float] = []
    step, stopped_by = 0, "steps"
    model.train()  # CLIP has no dropout by default: train and eval compute the same thing
    while True:
        out_of_time = time.perf_counter() - loop_started >= max_seconds
        last = step >= steps or out_of_time
        if out_of_time and step < steps:
            stopped_by = "time"
        with torch.set_grad_enabled(not last):
            out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
            logits = out.logits_per_image  # (N, N) = exp(logit_scale) * cosine
            loss = clip_loss(logits)
        curve.append(float(loss.detach()))
        accuracy.append(diagonal_accuracy(logits.detach()))
        if step in planned or last:
            cosine = (out.image_embeds @ out.text_embeds.T).detach().double().numpy()
            taken.append(
                Snapshot(
                    step=step,
                    loss=curve[-1],
                    diagonal_accuracy=accuracy[-1],
                    logit_scale=float(model.logit_scale.detach().exp()),
                    cosine=cosine,
                    logits=logits.detach().double().numpy(),
                )
            )
        if last:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        step += 1
        if on_step:
            on_step(step, steps)
    return DemoRun(
        snapshots=taken,
        loss_curve=curve,
        accuracy_curve=accuracy,
        steps_run=step,
        seconds=time.perf_counter() - started,
        stopped_by=stopped_by,
        parameters=sum(p.numel() for p in model.parameters()),
        config=cfg,
    )


# Drawing: Pillow only. ----------------------------------------------------------------------

# Anchors of matplotlib's viridis: perceptually even and readable by the colour-blind.
_PANELS_PER_ROW = 3


def loss_text(loss: float) -> str:
    """A loss to read: three decimals, or two significant digits once it is tiny."""
    return f"{loss:.3f}" if loss >= 0.01 else f"{loss:.2g}"


def _clip_text(text: str, limit: int) -> str:
    flat = " ".join(text.split())  # captions are data: one line each, whatever they hold
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def matrix_strip_png(snapshots: Sequence[Snapshot], captions: Sequence[str], names: Sequence[str]) -> bytes:
    """The cosine matrix at each snapshot, side by side on one colour scale, diagonal outlined.

    Rows are images (I1..IN), columns captions (T1..TN); a legend names both.
    """
    n = snapshots[0].cosine.shape[0]
    cell = 44 if n <= 5 else 38
    font, small = text_font(12), text_font(11)
    label_w, head_h, pad = 26, 52, 16
    panel_w, panel_h = label_w + n * cell + pad, head_h + n * cell + pad
    cols = min(_PANELS_PER_ROW, len(snapshots))
    rows = math.ceil(len(snapshots) / cols)
    legend_h = 30 + 16 * n
    width = max(cols * panel_w + pad, 420)
    height = 30 + rows * panel_h + legend_h
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 8), "cosine(image i, caption j) while training; red boxes: the true pairs", fill="black", font=font)
    # One scale for every panel, so brightening on the diagonal is real and not a re-stretch.
    lo = min(float(s.cosine.min()) for s in snapshots)
    hi = max(float(s.cosine.max()) for s in snapshots)
    span = hi - lo if hi > lo else 1.0
    for k, snap in enumerate(snapshots):
        x0 = pad + (k % cols) * panel_w
        y0 = 30 + (k // cols) * panel_h
        draw.text((x0, y0), f"step {snap.step}, loss {loss_text(snap.loss)}", fill="black", font=font)
        draw.text(
            (x0, y0 + 15), f"acc {snap.diagonal_accuracy:.2f}, scale {snap.logit_scale:.1f}", fill="dimgray", font=small
        )
        grid_x, grid_y = x0 + label_w, y0 + head_h
        for j in range(n):
            draw.text((grid_x + j * cell + cell // 2 - 7, grid_y - 16), f"T{j + 1}", fill="black", font=small)
        for i in range(n):
            draw.text((x0, grid_y + i * cell + cell // 2 - 7), f"I{i + 1}", fill="black", font=small)
            for j in range(n):
                value = float(snap.cosine[i, j])
                t = (value - lo) / span
                box = (grid_x + j * cell, grid_y + i * cell, grid_x + (j + 1) * cell - 1, grid_y + (i + 1) * cell - 1)
                draw.rectangle(box, fill=viridis(t))
                draw.text(
                    (box[0] + cell // 2, box[1] + cell // 2),
                    f"{value:.2f}",
                    fill="black" if t > 0.6 else "white",
                    font=small,
                    anchor="mm",
                )
                if i == j:
                    draw.rectangle(box, outline=(230, 20, 20), width=3)
    y = 30 + rows * panel_h
    draw.text((pad, y), f"colour scale: {lo:.2f} (dark) to {hi:.2f} (yellow)", fill="black", font=small)
    image_labels = [f"I{i + 1} = {_clip_text(name, 40)}" for i, name in enumerate(names)]
    caption_x = pad + 24 + max(draw.textlength(label, font=small) for label in image_labels)
    for i, (label, caption) in enumerate(zip(image_labels, captions, strict=True)):
        draw.text((pad, y + 18 + 16 * i), label, fill="black", font=small)
        draw.text((caption_x, y + 18 + 16 * i), f"T{i + 1} = {_clip_text(caption, 60)}", fill="black", font=small)
    return to_png(img)


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / max(ticks, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def loss_curve_png(losses: Sequence[float], marks: Sequence[int], *, chance: float | None = None) -> bytes:
    """Loss against step, with axes, ticks and labels; dots at the snapshot steps, a dashed chance line."""
    width, height = 560, 340
    left, right, top, bottom = 62, 20, 34, 52
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = text_font(13), text_font(11)
    draw.text((left, 8), "contrastive loss while training", fill="black", font=font)
    last = max(len(losses) - 1, 1)
    y_top = max([*losses, chance or 0.0]) * 1.05 or 1.0
    y_tick = _nice_step(y_top)
    y_top = math.ceil(y_top / y_tick) * y_tick
    plot_w, plot_h = width - left - right, height - top - bottom

    def at(step: float, loss: float) -> tuple[float, float]:
        return left + plot_w * step / last, top + plot_h * (1 - loss / y_top)

    x_tick = max(1, int(_nice_step(last)))
    for s in range(0, last + 1, x_tick):
        x, _ = at(s, 0)
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
        draw.line([(x, top), (x, top + plot_h)], fill=(235, 235, 235))
        draw.text((x, top + plot_h + 7), str(s), fill="black", font=small, anchor="ma")
    for k in range(round(y_top / y_tick) + 1):
        value = k * y_tick
        _, y = at(0, value)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.line([(left, y), (left + plot_w, y)], fill=(235, 235, 235))
        draw.text((left - 7, y), f"{value:g}", fill="black", font=small, anchor="rm")
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black", width=1)
    draw.text((left + plot_w / 2, height - 18), "step (updates)", fill="black", font=small, anchor="mm")
    draw.text((8, top + plot_h / 2), "loss", fill="black", font=small, anchor="lm")
    if chance is not None and chance <= y_top:
        _, y = at(0, chance)
        for x in range(left, left + plot_w, 10):
            draw.line([(x, y), (min(x + 5, left + plot_w), y)], fill=(200, 60, 60))
        red = (200, 60, 60)
        draw.text((left + plot_w - 4, y - 3), f"chance, ln N = {chance:.2f}", fill=red, font=small, anchor="rb")
    points = [at(s, v) for s, v in enumerate(losses)]
    if len(points) > 1:
        draw.line(points, fill=(35, 75, 215), width=2)
    for s in marks:
        if 0 <= s < len(losses):
            x, y = at(s, losses[s])
            draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=(35, 75, 215))
    return to_png(img)

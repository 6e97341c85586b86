"""`cliplens parity`: how far a reduced precision (bf16, int8, fp16) drifts from fp32.

int8 is opt-in and bf16 is chosen automatically on CPUs with native bf16, so both need
evidence: embedding cosines, zero-shot accuracy and retrieval agreement against the fp32
reference, on toy-world scenes rendered in memory, and the speed ratio from the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel

from .encoder import DEVICES, PRECISIONS, ClipEncoder, load_encoder, pick_device, pick_precision
from .toyeval import KIND_TEMPLATE, class_vectors, zero_shot_accuracy
from .toyworld import COLOURS, KINDS, render, single_scene

DEFAULT_SEED = 20261127  # toyeval's evaluation seed: never used in training (seed 0)
MAX_QUERIES = 24
TOP_K = 10


class PrecisionParity(BaseModel):
    precision: str  # as asked for; "auto" is resolved into `resolved`
    resolved: str | None = None
    skipped: str | None = None  # why it was not measured (e.g. fp16 on a CPU); None when measured
    image_cosine_mean: float | None = None
    image_cosine_min: float | None = None
    text_cosine_mean: float | None = None
    text_cosine_min: float | None = None
    object_accuracy: float | None = None
    colour_accuracy: float | None = None
    object_accuracy_delta: float | None = None  # precision minus fp32
    colour_accuracy_delta: float | None = None
    overlap_at_10: float | None = None  # mean share of the fp32 top-10 also in this top-10
    top1_agreement: float | None = None
    images_per_second: float | None = None
    speed_ratio: float | None = None  # images_per_second / fp32's, same run


class ParityReport(BaseModel):
    model: str
    device: str
    scenes: int
    seed: int
    queries: int
    fp32_object_accuracy: float
    fp32_colour_accuracy: float
    fp32_images_per_second: float
    precisions: list[PrecisionParity]


class _Run:
    """One encoder's outputs on the shared inputs."""

    def __init__(self, encoder: ClipEncoder, images: list[Image.Image], prompts: list[str], queries: list[str]):
        self.encoder = encoder
        # The fast path's pixels are the same for every precision: preprocess once, so the
        # timing measures the model, where precision acts, not the resize.
        self.pixels = np.stack([encoder.preprocess(im) for im in images]) if encoder.fast is not None else None
        self.images = images
        self.seconds = float("inf")
        self.image_vecs = self.embed()
        self.prompt_vecs = encoder.embed_texts(prompts)
        self.query_vecs = encoder.embed_texts(queries)
        self.classes = class_vectors(encoder)

    def embed(self) -> np.ndarray:
        start = time.perf_counter()
        vecs = (
            self.encoder.embed_pixels(self.pixels)
            if self.pixels is not None
            else self.encoder.embed_images(self.images)
        )
        self.seconds = min(self.seconds, time.perf_counter() - start)
        return vecs

    def accuracies(self, labels: list[tuple[str, str]]) -> tuple[float, float]:
        return zero_shot_accuracy(self.image_vecs, self.classes, labels)

    def top(self, k: int) -> np.ndarray:
        return np.argsort(-(self.query_vecs @ self.image_vecs.T), axis=1, kind="stable")[:, :k]


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Both are unit vectors already; renormalising guards against low-precision rounding.
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(1e-12)


def _check_precisions(precisions: Sequence[str]) -> list[str]:
    if isinstance(precisions, str):
        precisions = [precisions]
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision {p!r} is not one of {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(precisions))


def parity_report(
    model: str = "toy",
    device: str = "cpu",
    precisions: Sequence[str] = ("bf16", "int8"),
    scenes: int = 200,
    seed: int = DEFAULT_SEED,
    *,
    timing_rounds: int = 2,
) -> ParityReport:
    """Compare each precision with fp32 on `scenes` single-object toy scenes made from `seed`."""
    wanted = _check_precisions(precisions)
    if not 1 <= scenes <= 100_000:
        raise ValueError(f"scenes={scenes} is out of range: use 1 to 100000")
    dev = pick_device(device)
    rng = random.Random(seed)
    colours = list(COLOURS)
    # As toyeval's zero-shot set: one object of a random colour and kind per scene.
    world = [single_scene(rng, rng.choice(colours), rng.choice(KINDS)) for _ in range(scenes)]
    labels = [(s.objects[0].color, s.objects[0].kind) for s in world]
    images = [render(s) for s in world]
    prompts = [KIND_TEMPLATE.format(c=c, k=k) for k in KINDS for c in colours]
    pairs = list(dict.fromkeys(labels))[:MAX_QUERIES]
    queries = [KIND_TEMPLATE.format(c=c, k=k) for c, k in pairs]

    ref = _Run(load_encoder(model, device, "fp32"), images, prompts, queries)
    runs: dict[str, _Run] = {}
    rows: dict[str, PrecisionParity] = {}
    for p in wanted:
        try:
            resolved = pick_precision(p, dev)
        except ValueError as exc:
            rows[p] = PrecisionParity(precision=p, skipped=str(exc))
            continue
        rows[p] = PrecisionParity(precision=p, resolved=resolved)
        runs[p] = _Run(load_encoder(model, device, resolved), images, prompts, queries)
    # Timed in alternation, best of the rounds, so that load from elsewhere on the machine
    # falls on every precision alike rather than on whichever ran during it.
    for _ in range(max(0, timing_rounds - 1)):
        for run in (ref, *runs.values()):
            run.embed()

    ref_obj, ref_col = ref.accuracies(labels)
    ref_ips = scenes / ref.seconds
    k = min(TOP_K, scenes)
    ref_top = ref.top(k)
    for p, run in runs.items():
        img_cos = _rowwise_cosine(ref.image_vecs, run.image_vecs)
        txt_cos = _rowwise_cosine(ref.prompt_vecs, run.prompt_vecs)
        obj, col = run.accuracies(labels)
        top = run.top(k)
        overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, top, strict=True)])
        ips = scenes / run.seconds
        rows[p] = rows[p].model_copy(
            update={
                "image_cosine_mean": round(float(img_cos.mean()), 6),
                "image_cosine_min": round(float(img_cos.min()), 6),
                "text_cosine_mean": round(float(txt_cos.mean()), 6),
                "text_cosine_min": round(float(txt_cos.min()), 6),
                "object_accuracy": round(obj, 4),
                "colour_accuracy": round(col, 4),
                "object_accuracy_delta": round(obj - ref_obj, 4),
                "colour_accuracy_delta": round(col - ref_col, 4),
                "overlap_at_10": round(float(overlap), 4),
                "top1_agreement": round(float(np.mean(ref_top[:, 0] == top[:, 0])), 4),
                "images_per_second": round(ips, 1),
                "speed_ratio": round(ips / ref_ips, 3),
            }
        )
    return ParityReport(
        model=model,
        device=str(dev),
        scenes=scenes,
        seed=seed,
        queries=len(queries),
        fp32_object_accuracy=round(ref_obj, 4),
        fp32_colour_accuracy=round(ref_col, 4),
        fp32_images_per_second=round(ref_ips, 1),
        precisions=[rows[p] for p in wanted],
    )


def format_parity(report: ParityReport) -> str:
    lines = [
        f"precision parity of {report.model} on {report.device} against fp32: {report.scenes} toy scenes "
        f"(seed {report.seed}), {report.queries} retrieval queries",
        f"  fp32: object acc {report.fp32_object_accuracy:.3f}, colour acc {report.fp32_colour_accuracy:.3f}, "
        f"{report.fp32_images_per_second:.0f} img/s",
        f"  {'precision':10s} {'image cos mean/min':>19s} {'text cos mean/min':>19s} {'object acc (Δ)':>16s} "
        f"{'colour acc (Δ)':>16s} {'overlap@10':>10s} {'top-1 same':>10s} {'speed':>7s}",
    ]
    for r in report.precisions:
        name = r.precision if r.resolved in (None, r.precision) else f"{r.precision}→{r.resolved}"
        if r.skipped is not None:
            lines.append(f"  {name:10s} skipped: {r.skipped}")
            continue
        assert r.image_cosine_mean is not None and r.image_cosine_min is not None  # measured rows are full
        assert r.text_cosine_mean is not None and r.text_cosine_min is not None
        assert r.object_accuracy is not None and r.object_accuracy_delta is not None
        assert r.colour_accuracy is not None and r.colour_accuracy_delta is not None
        lines.append(
            f"  {name:10s} {r.image_cosine_mean:9.5f}/{r.image_cosine_min:<9.5f} "
            f"{r.text_cosine_mean:9.5f}/{r.text_cosine_min:<9.5f} "
            f"{r.object_accuracy:7.3f} ({r.object_accuracy_delta:+.3f}) "
            f"{r.colour_accuracy:7.3f} ({r.colour_accuracy_delta:+.3f}) "
            f"{r.overlap_at_10:10.3f} {r.top1_agreement:10.3f} {r.speed_ratio:6.2f}x"
        )
    return "\n".join(lines)


def add_parity_command(sub: Any) -> None:
    parity = sub.add_parser("parity", help="compare reduced precisions (bf16, int8, fp16) with fp32 on toy scenes")
    parity.add_argument("--model", default="toy", help="'toy' (bundled, default), a hub id or a folder")
    parity.add_argument("--device", choices=DEVICES, default="cpu")
    parity.add_argument(
        "--precision",
        action="append",
        choices=PRECISIONS,
        dest="precisions",
        metavar="P",
        help=f"repeatable; one of {', '.join(PRECISIONS)} (default: bf16 and int8)",
    )
    parity.add_argument("--scenes", type=int, default=200, help="toy scenes rendered in memory (default 200)")
    parity.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parity.add_argument("--json", action="store_true", help="print the report as JSON")


def run_parity_command(args: argparse.Namespace) -> int:
    report = parity_report(
        args.model, args.device, tuple(args.precisions or ("bf16", "int8")), scenes=args.scenes, seed=args.seed
    )
    print(json.dumps(report.model_dump(), indent=2) if args.json else format_parity(report))
    return 0

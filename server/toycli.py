"""The toy-world commands: `toyworld render`, `train-toy` and `eval-toy`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .encoder import DEVICES

EVAL_SEED = 20261127  # never used in training (seed 0) or by the tests


def add_toy_commands(sub: Any) -> None:
    world = sub.add_parser("toyworld", help="the procedurally drawn toy world")
    world_sub = world.add_subparsers(dest="toy_command", required=True, metavar="ACTION")
    render = world_sub.add_parser("render", help="write N scenes and labels.jsonl into OUT")
    render.add_argument("out", type=Path)
    render.add_argument("--count", type=int, default=100)
    render.add_argument("--seed", type=int, default=1)
    render.add_argument(
        "--training", action="store_true", help="like the training world: no held-out (colour, object) pairs"
    )
    render.add_argument("--size", type=int, default=128, help="pixels per side (default 128)")

    train = sub.add_parser("train-toy", help="train the small toy-world CLIP from scratch")
    train.add_argument("--out", type=Path, default=Path("toy-clip"), help="where to save the model folder")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--samples", type=int, default=None, help="samples to train on (the run's length)")
    train.add_argument("--pool", type=int, default=None, help="distinct scenes rendered for training")
    train.add_argument("--eval-seed", type=int, default=EVAL_SEED)

    evaluate = sub.add_parser("eval-toy", help="evaluate a model on a fresh toy world")
    evaluate.add_argument("--seed", type=int, default=EVAL_SEED)
    evaluate.add_argument("--model", default="toy", help="'toy' (bundled), a hub id or a folder")
    evaluate.add_argument("--device", choices=DEVICES, default="auto")
    evaluate.add_argument("--json", action="store_true")


def _positive(name: str, value: int, most: int) -> int:
    if not 1 <= value <= most:
        raise ValueError(f"{name}={value} is out of range: use 1 to {most}")
    return value


def run_toy_command(args: argparse.Namespace) -> int:
    from .toyworld import render_folder

    if args.command == "toyworld":
        count = _positive("--count", args.count, 1_000_000)
        size = _positive("--size", args.size, 2048)
        labels = render_folder(args.out, count=count, seed=args.seed, held_out=not args.training, size=size)
        print(f"wrote {count} scenes and {labels}")
        return 0
    if args.command == "train-toy":
        return _train(args)
    return _evaluate(args)


def _train(args: argparse.Namespace) -> int:
    from .encoder import ClipEncoder, pick_device
    from .toyeval import evaluate, write_model_card
    from .toytrain import TrainConfig, train

    overrides = {k: v for k, v in (("samples", args.samples), ("pool", args.pool)) if v is not None}
    cfg = TrainConfig(seed=args.seed, **overrides)
    _positive("--samples", cfg.samples, 100_000_000)
    _positive("--pool", cfg.pool, 10_000_000)

    def show(entry: Any) -> None:
        print(
            f"step {entry.step:5d}  samples {entry.samples:7d}  loss {entry.loss:.4f}  "
            f"diagonal {entry.diagonal_accuracy:.3f}  scale {entry.logit_scale:6.2f}  {entry.seconds:7.1f}s",
            file=sys.stderr,
            flush=True,
        )

    model, processor, history = train(cfg, args.out, on_step=show)
    encoder = ClipEncoder(model, processor, str(args.out), pick_device("cpu"))
    report = evaluate(encoder, args.eval_seed)
    write_model_card(args.out, cfg, history, report)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .encoder import load_encoder
    from .toyeval import evaluate, format_report

    encoder = load_encoder(args.model, args.device)
    report = evaluate(encoder, args.seed)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 0

"""`cliplens`: serve MCP (stdio or HTTP), or run any tool's core from the shell."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from .bench import add_bench_command, run_bench_command
from .config import ENV_ALLOW, Settings
from .encoder import DEVICES, PRECISIONS, ModelLoadError
from .filters import Filters
from .images import ImageRejected
from .parity import add_parity_command, run_parity_command
from .store import StoreError
from .toycli import add_toy_commands, run_toy_command

log = logging.getLogger("cliplens")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local folder of a CLIP-family model (env CLIPLENS_MODEL)")
    parser.add_argument("--db", type=Path, help="embedded store folder (env CLIPLENS_DB)")
    parser.add_argument("--chroma-url", help="use a Chroma server, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--allow",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help=f"a folder the server may read; repeatable (env {ENV_ALLOW}, separated by ':')",
    )
    parser.add_argument("--device", choices=DEVICES, help="where the model runs (default: auto)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="inference path (env CLIPLENS_PRECISION; default auto: fp16 on CUDA, bf16 on CPUs with native bf16)",
    )
    parser.add_argument("--json", action="store_true", help="print the tool's structured output as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cliplens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    _common(serve)
    serve.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765)")
    serve.add_argument("--token", help="bearer token required by HTTP clients (env CLIPLENS_HTTP_TOKEN)")
    serve.add_argument("--allowed-host", action="append", default=[], help="extra Host header value to accept")
    serve.add_argument("--no-thumbnails", action="store_true", help="never attach thumbnails to search results")
    serve.add_argument(
        "--call-timeout",
        type=float,
        metavar="SECONDS",
        help="longest a foreground index_folder call runs before stopping between batches "
        "(env CLIPLENS_CALL_TIMEOUT, default 900)",
    )

    index = sub.add_parser("index", help="index a folder")
    _common(index)
    index.add_argument("path")
    index.add_argument("--no-recursive", action="store_true", help="only the folder itself")
    index.add_argument("--no-prune", action="store_true", help="keep entries of deleted files")

    search = sub.add_parser("search", help="search the index by text")
    _common(search)
    search.add_argument("query")
    search.add_argument("--top-k", type=int, default=8)
    search.add_argument("--folder")
    search.add_argument("--min-score", type=float)
    search.add_argument(
        "--cutoff",
        choices=("calibrated", "none"),
        default="calibrated",
        help="calibrated: only hits that beat generic prompts (default); none: the top k, each flagged",
    )
    search.add_argument("--taken-after", metavar="YYYY-MM-DD", help="captured on or after this day (EXIF, else mtime)")
    search.add_argument("--taken-before", metavar="YYYY-MM-DD", help="captured on or before this day")

    classify = sub.add_parser("classify", help="zero-shot classify images")
    _common(classify)
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    classify.add_argument("--label", action="append", required=True, dest="labels", metavar="L")
    classify.add_argument("--template", action="append", dest="templates", metavar="T")

    explain = sub.add_parser("explain", help="explain the image-caption similarity matrix")
    _common(explain)
    explain.add_argument("--image", action="append", required=True, dest="images", metavar="I")
    explain.add_argument("--caption", action="append", required=True, dest="captions", metavar="C")
    explain.add_argument("--heatmap", type=Path, help="write the heatmap PNG here")

    demo = sub.add_parser("demo", help="the whole product offline: render, index, search, explain")
    demo.add_argument("out", type=Path, nargs="?", default=Path("cliplens-demo"))
    demo.add_argument("--model", default="toy", help="'toy' (the bundled model, default), a hub id or a folder")
    demo.add_argument("--device", choices=DEVICES)
    add_toy_commands(sub)
    add_bench_command(sub)
    add_parity_command(sub)
    return parser


def _settings(args: argparse.Namespace, *, default_allow: Sequence[Path]) -> Settings:
    settings = Settings.from_env(
        model=args.model,
        device=args.device,
        precision=args.precision,
        db_dir=args.db,
        chroma_url=args.chroma_url,
        allow=args.allow,
        call_timeout=getattr(args, "call_timeout", None),
    )
    if not settings.allow:
        # The shell user already has their own rights; only the server needs --allow.
        settings.allow = list(default_allow)
    return settings


def _progress_bar(done: int, total: int, message: str) -> None:
    width = 30
    filled = width if total == 0 else int(width * done / total)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {message[:40]:40}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _absolute(paths: Sequence[str]) -> list[str]:
    return [str(Path(p).absolute()) for p in paths]


def _run_tool(args: argparse.Namespace) -> int:
    from ..tools import explain_similarity_matrix as ex
    from ..tools import index_folder as ix
    from ..tools import search_images as se
    from ..tools import zero_shot_classify as zs
    from .app import AppContext, open_engine

    # Inputs are checked before the model loads, so a typo fails in a moment, not seconds.
    if args.command == "index":
        ireq = ix.IndexFolderInput(
            path=_absolute([args.path])[0], recursive=not args.no_recursive, prune=not args.no_prune
        )
        progress = None if args.json else _progress_bar

        def run(app: AppContext) -> BaseModel:
            return ix.index_folder(app.encoder, app.store, app.policy, ireq, progress=progress)

        def human(r: Any) -> str:
            return (
                f"{r.folder}: {r.scanned} images, {r.added} added, {r.updated} updated, {r.unchanged} unchanged, "
                f"{r.removed} removed, {r.skipped_count} skipped in {r.seconds:.1f}s "
                f"({r.images_per_second:.1f} img/s, {r.model} on {r.device} in {r.precision}"
                + (f", {r.reused} reused" if r.reused else "")
                + ")"
                + "".join(f"\n  skipped {s.reason}: {s.path}" for s in r.skipped)
            )
    elif args.command == "search":
        sreq = se.SearchImagesInput(
            query=args.query,
            top_k=args.top_k,
            folder=_absolute([args.folder])[0] if args.folder else None,
            min_score=args.min_score,
            thumbnails=False,
            cutoff=args.cutoff,
            filters=Filters(taken_after=args.taken_after, taken_before=args.taken_before)
            if args.taken_after or args.taken_before
            else None,
        )

        def run(app: AppContext) -> BaseModel:
            return se.search_images(app.encoder, app.store, app.policy, sreq)

        def human(r: Any) -> str:
            lines = [f"{h.rank:3d}  {h.score:+.4f}  {'✓' if h.confident else ' '}  {h.path}" for h in r.hits]
            notes = [*r.warnings, r.why, *([r.hint] if r.hint else [])]
            return "\n".join(lines + notes)
    elif args.command == "classify":
        zreq = zs.ZeroShotInput(images=_absolute(args.images), labels=args.labels, templates=args.templates)

        def run(app: AppContext) -> BaseModel:
            return zs.zero_shot_classify(app.encoder, app.policy, zreq)

        def human(r: Any) -> str:
            return "\n".join(f"{c.image}: {c.top_label} ({c.probabilities[c.top_label]:.3f})" for c in r.results)
    else:
        ereq = ex.ExplainInput(images=_absolute(args.images), captions=args.captions)

        def run(app: AppContext) -> BaseModel:
            result = ex.explain_similarity_matrix(app.encoder, app.policy, ereq)
            if args.heatmap:
                from .render import heatmap_png

                args.heatmap.write_bytes(heatmap_png(np.array(result.cosine)))
            return result

        def human(r: Any) -> str:
            return format_matrix(r.cosine, r.loss, r.loss_kind, r.readings)

    with open_engine(_settings(args, default_allow=[Path(Path.cwd().anchor)]), resume_jobs=False) as app:
        result = run(app)
    print(result.model_dump_json(indent=2) if args.json else human(result))
    return 0


def format_matrix(cosine: list[list[float]], loss: float, loss_kind: str, readings: Sequence[object]) -> str:
    n = len(cosine)
    lines = ["cosine   " + " ".join(f"{'T' + str(j + 1):>7}" for j in range(n))]
    for i, row in enumerate(cosine):
        cells = " ".join(f"{'[' if i == j else ' '}{v:+.3f}{']' if i == j else ' '}" for j, v in enumerate(row))
        lines.append(f"I{i + 1:<7} {cells}")
    # A well-trained model's loss on a clean batch can be tiny: keep its digits visible.
    shown = f"{loss:.4f}" if loss >= 1e-3 else f"{loss:.2e}"
    lines.append(f"loss = {shown}  ({loss_kind})")
    lines.extend(getattr(r, "text", str(r)) for r in readings)
    return "\n".join(lines)


def _serve(args: argparse.Namespace) -> int:
    from .app import build_server, open_engine

    settings = _settings(args, default_allow=[])
    if args.no_thumbnails:
        settings.thumbnails = False
    if not settings.allow:
        log.warning("no folder is allowed yet: tools will refuse paths until you pass --allow DIR or set %s", ENV_ALLOW)
    if args.http:
        from .http import check_exposure, serve_http

        check_exposure(args.host, args.token, args.allowed_host)
    # The engine opens before any transport starts: a bad --model or --db is reported
    # once, plainly, instead of from inside the transport's task groups.
    with contextlib.ExitStack() as stack:
        # Under stdio, stdout is the protocol channel: anything a library prints while the
        # model loads goes to stderr instead.
        with contextlib.redirect_stdout(sys.stderr):
            engine = stack.enter_context(open_engine(settings))
        server = build_server(settings, engine=engine)
        if not args.http:
            server.run("stdio")
            return 0
        return serve_http(server, host=args.host, port=args.port, token=args.token, extra_hosts=args.allowed_host)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.out, model=args.model, device=args.device or "auto")
        if args.command in ("toyworld", "train-toy", "eval-toy"):
            return run_toy_command(args)
        if args.command == "bench":
            return run_bench_command(args)
        if args.command == "parity":
            return run_parity_command(args)
        return _run_tool(args)
    except (ModelLoadError, StoreError, ValidationError, ValueError, ImageRejected) as exc:
        print(f"cliplens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cliplens: interrupted; batches already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

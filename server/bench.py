"""`cliplens bench`: one command whose figures are ratios measured in the same run.

Absolute speeds say more about the machine than about cliplens, so each headline figure
is a ratio of two rates measured minutes apart on the same machine: cliplens against a
naive pipeline, against its own encoder, search against the text tower alone. Each phase
runs in a fresh subprocess (`python -m cliplens.server.bench --phase NAME ...`) so that
its peak memory is its own. The command prints PASS or MISS next to each target and
exits 0 either way: it is a measurement, not a test. It exits nonzero only on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .bench_corpus import CorpusKind, ensure_images, ensure_tiny_files, link_view
from .bench_phases import PhaseParams, run_phase

DEFAULT_VECTORS = (10_000, 100_000)
TARGETS = {  # figure -> (comparison, bound, unit)
    "big_speedup": (">=", 4.0, "×"),
    "small_efficiency": (">=", 0.85, "×"),
    "reindex_files_s": (">=", 20_000.0, " files/s"),
    "search_text_ratio": ("<=", 2.0, "×"),
    "recall_at_10": (">=", 0.95, ""),  # the issue sets it at 1M vectors; every size is held to it
}


class BenchError(RuntimeError):
    """A phase failed: the bench could not measure, as opposed to measuring a slow result."""


@dataclass(frozen=True)
class BenchOptions:
    model: str | None = None  # None: a random-weight ViT-B/32 built for this run
    device: str = "auto"
    precision: str = "auto"
    work: Path | None = None  # corpus cache and scratch; None: the user cache folder
    big: int = 24
    small: int = 192
    png: int = 64
    files: int = 20_000
    vectors: tuple[int, ...] = DEFAULT_VECTORS
    queries: int = 100
    big_size: tuple[int, int] = (4000, 3000)
    seed: int = 0
    isolate: bool = True  # each phase in its own process (only tests turn this off)

    def validate(self) -> BenchOptions:
        """Raise ValueError naming the option and its allowed range; return self."""
        from .encoder import DEVICES, PRECISIONS

        limits = {"--big": (self.big, 1, 10_000), "--small": (self.small, 1, 100_000), "--png": (self.png, 0, 100_000)}
        limits |= {"--files": (self.files, 1, 5_000_000), "--queries": (self.queries, 1, 4_000)}
        for name, (value, low, high) in limits.items():
            if not low <= value <= high:
                raise ValueError(f"{name}={value} is out of range: use {low} to {high}")
        if not self.vectors or any(not 100 <= v <= 20_000_000 for v in self.vectors):
            raise ValueError(f"--vectors {list(self.vectors)}: give sizes from 100 to 20000000, e.g. 10000,100000")
        if not all(16 <= side <= 20_000 for side in self.big_size):
            raise ValueError(f"--big-size {self.big_size[0]}x{self.big_size[1]}: each side must be 16 to 20000")
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        from .encoder import pick_device, pick_precision

        # Here rather than in the phases: fp16 on a CPU, or cuda without a GPU, fails at once.
        pick_precision(self.precision, pick_device(self.device))
        return self


def default_work_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("cliplens", appauthor=False)) / "bench"


def _stderr(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _spawn(name: str, params: PhaseParams, run_dir: Path) -> dict[str, Any]:
    out = run_dir / f"result-{name}-{params.vectors}.json"
    cmd = [sys.executable, "-m", "cliplens.server.bench", "--phase", name, "--params", json.dumps(asdict(params))]
    # stdout stays the report's; a phase's own chatter (and tracebacks) goes to stderr.
    try:
        chatter: int | None = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stderr without a descriptor
        chatter = None
    proc = subprocess.run([*cmd, "--out", str(out)], stdout=chatter, check=False)
    result = json.loads(out.read_text()) if out.exists() else {}
    if proc.returncode != 0 or "error" in result:
        raise BenchError(f"phase {name} failed (exit {proc.returncode}): {result.get('error', 'see its output above')}")
    return result


def run_bench(options: BenchOptions, note: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Make or reuse the corpus, run every phase, and return the report (see format_report)."""
    opts = options.validate()
    work = (opts.work or default_work_dir()).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    big_kind = CorpusKind("big", *opts.big_size, ".jpg")
    big = ensure_images(work, big_kind, opts.big, opts.seed, note=note)
    small = ensure_images(work, CorpusKind("small", 640, 480, ".jpg"), opts.small, opts.seed, note=note)
    png = ensure_images(work, CorpusKind("small", 640, 480, ".png"), opts.png, opts.seed, note=note)
    tiny = ensure_tiny_files(work, opts.files, opts.seed, note=note)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    results: dict[str, Any] = {}

    def phase(name: str, params: PhaseParams) -> dict[str, Any]:
        note(f"phase {name}{f' ({params.vectors} vectors)' if params.vectors else ''}")
        started = time.perf_counter()
        got = _spawn(name, params, run_dir) if opts.isolate else run_phase(name, params)
        note(f"phase {name} done in {time.perf_counter() - started:.1f}s")
        return got

    try:
        model = opts.model
        base = PhaseParams(model or "", opts.device, opts.precision, str(run_dir), seed=opts.seed)
        if model is None:
            model = str(run_dir / "vit-b32-random")
            phase("model", replace(base, folder=model))
            base = replace(base, model=model)
        big_view = str(link_view(big, run_dir / "big"))
        results["naive"] = phase("naive", replace(base, folder=big_view))
        results["cliplens-big"] = phase("cliplens-big", replace(base, folder=big_view))
        small_view = str(link_view(small, run_dir / "small-jpg"))
        png_view = str(link_view(png, run_dir / "small-png")) if png else ""
        results["small"] = phase("small", replace(base, folder=small_view, png_folder=png_view))
        results["reindex"] = phase("reindex", replace(base, folder=str(tiny)))
        for count in sorted(set(opts.vectors)):
            results[f"vectors-{count}"] = phase("vectors", replace(base, vectors=count, queries=opts.queries))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    corpus = {
        "big": {"count": len(big), "size": list(opts.big_size), "mean_mb": _mean_mb(big)},
        "small_jpeg": {"count": len(small), "size": [640, 480], "mean_mb": _mean_mb(small)},
        "small_png": {"count": len(png), "size": [640, 480], "mean_mb": _mean_mb(png)},
        "tiny_files": opts.files,
    }
    return build_report(opts, model if opts.model else None, results, corpus)


def _mean_mb(files: Sequence[Path]) -> float:
    return sum(p.stat().st_size for p in files) / len(files) / 1e6 if files else 0.0


def machine_info() -> dict[str, Any]:
    """The CPU as /proc/cpuinfo names it, its cores, and whether it has bf16 instructions."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        import platform

        name = platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch

    # Asked here, in the parent, after the phases: a CUDA context in a phase would add to its RSS.
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "cpu": name,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def build_report(
    opts: BenchOptions, model: str | None, results: dict[str, Any], corpus: dict[str, Any]
) -> dict[str, Any]:
    naive, big, small = results["naive"], results["cliplens-big"], results["small"]
    searches = sorted((r for k, r in results.items() if k.startswith("vectors-")), key=lambda r: r["vectors"])
    for row in searches:
        row["search_text_ratio"] = row["search_p50_ms"] / row["text_p50_ms"]
    figures: dict[str, Any] = {
        "naive_big_img_s": naive["img_s"],
        "cliplens_big_img_s": big["img_s"],
        "big_speedup": big["img_s"] / naive["img_s"],
        "encoder_small_img_s": small["encoder_img_s"],
        "cliplens_small_img_s": small["jpeg"]["img_s"],
        "small_efficiency": small["jpeg"]["img_s"] / small["encoder_img_s"],
        "small_batch_size": small["batch_size"],
        "reindex_files": results["reindex"]["files"],
        "reindex_files_s": results["reindex"]["files_s"],
        "search": searches,
    }
    if "png" in small:
        figures["cliplens_png_img_s"] = small["png"]["img_s"]
        figures["png_efficiency"] = small["png"]["img_s"] / small["encoder_img_s"]
    targets = [_target(name, figures[name]) for name in ("big_speedup", "small_efficiency", "reindex_files_s")]
    targets += [_target("search_text_ratio", r["search_text_ratio"], f"@{r['vectors']}") for r in searches]
    targets += [_target("recall_at_10", r["recall_at_10"], f"@{r['vectors']}") for r in searches]
    machine = machine_info() | {k: big.get(k) for k in ("torch_threads", "device", "precision")}
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    return {
        "machine": machine,
        "model": model or "random-weight ViT-B/32 (transformers CLIPConfig defaults)",
        "options": options,
        "corpus": corpus,
        "figures": figures,
        "targets": targets,
        "peak_rss_mib": {name: r.get("peak_rss_mib") for name, r in results.items()},
        "peak_gpu_mib": {name: r["peak_gpu_mib"] for name, r in results.items() if "peak_gpu_mib" in r},
        "phases": results,
    }


def _target(name: str, value: float, suffix: str = "") -> dict[str, Any]:
    op, bound, unit = TARGETS[name]
    ok = value >= bound if op == ">=" else value <= bound
    return {"name": name + suffix, "value": value, "op": op, "target": bound, "unit": unit.strip(), "pass": ok}


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def format_report(report: dict[str, Any]) -> str:
    """The report as text: the machine, then each figure with its target and PASS/MISS."""
    m, f, c = report["machine"], report["figures"], report["corpus"]
    verdict = {t["name"]: t for t in report["targets"]}

    def row(label: str, value: str, name: str = "") -> str:
        t = verdict.get(name)
        if t is None:
            return f"    {label:<42} {value:>18}".rstrip()
        unit = "×" if t["unit"] == "×" else ""  # other units are on the measured value already
        goal = f"{'≥' if t['op'] == '>=' else '≤'} {t['target']:,g}{unit}"
        return f"    {label:<42} {value:>18}  {goal:>9}  {'PASS' if t['pass'] else 'MISS'}"

    big = "{}x{}".format(*c["big"]["size"])
    lines = [
        "cliplens bench",
        f"  cpu        {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch threads {m['torch_threads']}",
        f"  bf16       avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, amx_bf16 {'yes' if m['amx_bf16'] else 'no'}",
        f"  gpu        {m['gpu'] or 'none'}",
        f"  model      {report['model']}",
        f"  precision  {m['precision']} on {m['device']} (the naive pipeline runs fp32)",
        f"  corpus     {c['big']['count']} × {big} JPEG ({c['big']['mean_mb']:.1f} MB each), "
        f"{c['small_jpeg']['count']} × 640x480 JPEG, {c['small_png']['count']} × 640x480 PNG, "
        f"{c['tiny_files']} tiny files",
        "",
        f"1 indexing {big} JPEGs",
        row("naive: PIL + HF processor + fp32 + Chroma", f"{f['naive_big_img_s']:.2f} img/s"),
        row("cliplens index_folder", f"{f['cliplens_big_img_s']:.2f} img/s"),
        row("cliplens / naive", f"{f['big_speedup']:.2f}×", "big_speedup"),
        "2 indexing 640x480 files against the encoder alone",
        row(f"encoder alone (batch {f['small_batch_size']})", f"{f['encoder_small_img_s']:.2f} img/s"),
        row("cliplens index_folder, JPEG", f"{f['cliplens_small_img_s']:.2f} img/s"),
        row("cliplens JPEG / encoder", f"{f['small_efficiency']:.2f}×", "small_efficiency"),
    ]
    if "png_efficiency" in f:
        lines.append(row("cliplens index_folder, PNG", f"{f['cliplens_png_img_s']:.2f} img/s"))
        lines.append(row("cliplens PNG / encoder (no target)", f"{f['png_efficiency']:.2f}×"))
    lines.append("3 unchanged re-index")
    files = f"{f['reindex_files']} files"
    lines.append(row(f"index_folder again, {files}", f"{f['reindex_files_s']:,.0f} files/s", "reindex_files_s"))
    lines.append("4/5 search and recall (distinct queries, CLIP-like vectors)")
    for r in f["search"]:
        at = _size(r["vectors"])
        ms = f"{r['search_p50_ms']:.1f} / {r['search_p95_ms']:.1f} ms"
        lines += [
            row(f"@{at}: search_images p50 / p95", ms),
            row(f"@{at}: text tower alone p50", f"{r['text_p50_ms']:.1f} ms"),
            row(f"@{at}: search p50 / text p50", f"{r['search_text_ratio']:.2f}×", f"search_text_ratio@{r['vectors']}"),
            row(f"@{at}: recall@10 vs exact search", f"{r['recall_at_10']:.3f}", f"recall_at_10@{r['vectors']}"),
            row(f"@{at}: store inserts", f"{r['insert_vectors_s']:,.0f} vec/s"),
        ]
    rss = report["peak_rss_mib"]
    shown = ", ".join(f"{k} {v:.0f}" if v is not None else f"{k} n/a" for k, v in rss.items())
    lines.append(f"6 peak RSS per phase, MiB: {shown}")
    if report["peak_gpu_mib"]:
        lines.append("  peak GPU memory, MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in report["peak_gpu_mib"].items()))
    return "\n".join(lines)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 10000,100000"
        ) from None


def _dimensions(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 4000x3000")
    return int(width), int(height)


def add_bench_command(sub: Any) -> None:
    from .encoder import DEVICES, PRECISIONS

    d = BenchOptions()
    bench = sub.add_parser(
        "bench",
        help="measure indexing, re-indexing and search speed as ratios (a measurement: exits 0 on MISS)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--model", help="hub id, folder or 'toy' (default: a random-weight ViT-B/32 built per run)")
    bench.add_argument("--device", choices=DEVICES, default=d.device)
    bench.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="cliplens precision (naive: fp32)")
    bench.add_argument(
        "--work", type=Path, help="corpus cache and scratch (default: cliplens/bench in the user cache folder)"
    )
    bench.add_argument("--big", type=int, default=d.big, help=f"12-megapixel JPEGs (default {d.big})")
    bench.add_argument("--small", type=int, default=d.small, help=f"640x480 JPEGs (default {d.small})")
    bench.add_argument("--png", type=int, default=d.png, help=f"640x480 PNGs, 0 for none (default {d.png})")
    bench.add_argument("--files", type=int, default=d.files, help=f"files for the re-index (default {d.files})")
    bench.add_argument(
        "--vectors",
        type=_int_list,
        default=d.vectors,
        help="store sizes for search latency and recall@10, e.g. 10000,100000,1000000 (default 10000,100000)",
    )
    bench.add_argument(
        "--queries", type=int, default=d.queries, help=f"distinct queries per size (default {d.queries})"
    )
    bench.add_argument("--big-size", type=_dimensions, default=d.big_size, help="size of the big JPEGs (4000x3000)")
    bench.add_argument("--seed", type=int, default=d.seed)
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON to FILE")


def run_bench_command(args: argparse.Namespace) -> int:
    options = BenchOptions(
        model=args.model,
        device=args.device,
        precision=args.precision,
        work=args.work,
        big=args.big,
        small=args.small,
        png=args.png,
        files=args.files,
        vectors=args.vectors,
        queries=args.queries,
        big_size=args.big_size,
        seed=args.seed,
    ).validate()
    try:
        report = run_bench(options)
    except BenchError as exc:
        print(f"cliplens: error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    return 0


def _phase_main(argv: Sequence[str]) -> int:
    """A phase's own process: run it, write its result (or error) as JSON to --out."""
    parser = argparse.ArgumentParser(prog="python -m cliplens.server.bench")
    parser.add_argument("--phase", required=True)
    parser.add_argument("--params", required=True, help="PhaseParams as JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = run_phase(args.phase, PhaseParams(**json.loads(args.params)))
    except Exception as exc:  # reported to the parent, which names the phase and stops
        import traceback

        traceback.print_exc()
        args.out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_phase_main(sys.argv[1:]))

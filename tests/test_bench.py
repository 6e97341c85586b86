"""`cliplens bench` at tiny sizes: every figure is there, positive, and each ratio is the
ratio of the rates it is made from. The speeds themselves mean nothing at these sizes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from cliplens.server import cli
from cliplens.server.bench import BenchError, BenchOptions, _phase_main, _spawn, format_report, run_bench
from cliplens.server.bench_phases import PhaseParams


@pytest.fixture(scope="module")
def report(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    options = BenchOptions(
        model=str(tiny_clip),
        device="cpu",
        work=tmp_path_factory.mktemp("bench-work"),
        big=2,
        big_size=(400, 300),
        small=3,
        png=2,
        files=40,
        vectors=(200, 300),
        queries=3,
        isolate=False,  # one process keeps this test fast; the CLI always isolates phases
    )
    return run_bench(options, note=lambda _: None)


def test_every_figure_is_present_and_positive(report: dict[str, Any]) -> None:
    f = report["figures"]
    rates = ["naive_big_img_s", "cliplens_big_img_s", "encoder_small_img_s", "cliplens_small_img_s"]
    rates += ["cliplens_png_img_s", "reindex_files_s", "big_speedup", "small_efficiency", "png_efficiency"]
    for name in rates:
        assert f[name] > 0, name
    assert f["reindex_files"] == 40
    assert [r["vectors"] for r in f["search"]] == [200, 300]
    for row in f["search"]:
        assert row["queries"] == 3
        assert row["text_p50_ms"] > 0 and 0 < row["search_p50_ms"] <= row["search_p95_ms"]
        assert row["insert_vectors_s"] > 0
        assert 0 < row["recall_at_10"] <= 1
    assert set(report["peak_rss_mib"]) == {"naive", "cliplens-big", "small", "reindex", "vectors-200", "vectors-300"}
    assert all(mib > 0 for mib in report["peak_rss_mib"].values())
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["torch_threads"] >= 1 and machine["cpu"]
    assert machine["precision"] in ("fp32", "bf16", "fp16", "int8")
    json.dumps(report)  # what --json writes


def test_ratios_are_made_from_their_rates(report: dict[str, Any]) -> None:
    f = report["figures"]
    assert f["big_speedup"] == pytest.approx(f["cliplens_big_img_s"] / f["naive_big_img_s"])
    assert f["small_efficiency"] == pytest.approx(f["cliplens_small_img_s"] / f["encoder_small_img_s"])
    assert f["png_efficiency"] == pytest.approx(f["cliplens_png_img_s"] / f["encoder_small_img_s"])
    for row in f["search"]:
        assert row["search_text_ratio"] == pytest.approx(row["search_p50_ms"] / row["text_p50_ms"])
    phases = report["phases"]
    big = phases["cliplens-big"]
    assert big["img_s"] == pytest.approx(big["images"] / big["seconds"])
    assert phases["reindex"]["files_s"] == pytest.approx(40 / phases["reindex"]["seconds"])


def test_each_target_is_judged_against_its_figure(report: dict[str, Any]) -> None:
    f = report["figures"]
    targets = {t["name"]: t for t in report["targets"]}
    expected = {"big_speedup", "small_efficiency", "reindex_files_s"}
    expected |= {f"{name}@{n}" for name in ("search_text_ratio", "recall_at_10") for n in (200, 300)}
    assert set(targets) == expected
    assert targets["big_speedup"]["value"] == f["big_speedup"]
    assert targets["search_text_ratio@300"]["value"] == f["search"][1]["search_text_ratio"]
    assert targets["recall_at_10@200"]["value"] == f["search"][0]["recall_at_10"]
    for t in targets.values():
        assert t["pass"] == (t["value"] >= t["target"] if t["op"] == ">=" else t["value"] <= t["target"])
    text = format_report(report)
    assert text.count("PASS") + text.count("MISS") == len(expected)
    assert "avx512_bf16" in text and "peak RSS" in text


def test_bad_arguments_fail_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"--big=0 is out of range: use 1 to"):
        BenchOptions(big=0).validate()
    with pytest.raises(ValueError, match="--precision 'fp8'"):
        BenchOptions(precision="fp8").validate()
    assert cli.main(["bench", "--vectors", "10"]) == 2  # checked before any image is made
    assert "--vectors [10]: give sizes from 100" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--vectors", "ten"])
    assert exc.value.code == 2
    assert "not a comma-separated list of integers" in capsys.readouterr().err


def test_a_failing_phase_is_reported_by_name(tmp_path: Path) -> None:
    params = PhaseParams("unused", "cpu", "auto", str(tmp_path))
    out = tmp_path / "out.json"
    argv = ["--phase", "nope", "--params", json.dumps(asdict(params)), "--out", str(out)]
    assert _phase_main(argv) == 1
    assert "unknown phase 'nope'" in json.loads(out.read_text())["error"]
    # The same through a real subprocess, as the CLI runs every phase.
    with pytest.raises(BenchError, match=r"phase nope failed \(exit 1\): ValueError: unknown phase"):
        _spawn("nope", params, tmp_path)

"""`cliplens parity`: reduced precisions against fp32 on the bundled toy model."""

from __future__ import annotations

import json

import pytest

from cliplens.server.cli import main
from cliplens.server.parity import ParityReport, format_parity, parity_report

SCENES = 40


@pytest.fixture(scope="module")
def report() -> ParityReport:
    return parity_report("toy", "cpu", ("bf16", "int8", "fp16"), scenes=SCENES, seed=7)


def test_fp16_is_skipped_on_the_cpu_with_its_reason(report: ParityReport) -> None:
    fp16 = next(r for r in report.precisions if r.precision == "fp16")
    assert fp16.skipped is not None and "needs a GPU" in fp16.skipped
    assert fp16.image_cosine_mean is None and fp16.speed_ratio is None
    assert "fp16       skipped: precision 'fp16' needs a GPU" in format_parity(report)


@pytest.mark.parametrize(("precision", "floor"), [("bf16", 0.99), ("int8", 0.95)])
def test_reduced_precisions_agree_with_fp32(report: ParityReport, precision: str, floor: float) -> None:
    row = next(r for r in report.precisions if r.precision == precision)
    assert row.skipped is None and row.resolved == precision
    assert row.image_cosine_mean is not None and row.image_cosine_mean > floor
    assert row.text_cosine_mean is not None and row.text_cosine_mean > floor
    assert row.image_cosine_min is not None and row.image_cosine_min <= row.image_cosine_mean
    for acc in (row.object_accuracy, row.colour_accuracy, report.fp32_object_accuracy, report.fp32_colour_accuracy):
        assert acc is not None and 0.0 <= acc <= 1.0
    assert row.object_accuracy_delta == pytest.approx(row.object_accuracy - report.fp32_object_accuracy, abs=1e-3)
    for share in (row.overlap_at_10, row.top1_agreement):
        assert share is not None and 0.0 <= share <= 1.0
    assert row.speed_ratio is not None and row.speed_ratio > 0
    assert 1 <= report.queries <= 24 and report.scenes == SCENES


def test_cli_json_has_the_reports_keys(report: ParityReport, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["parity", "--scenes", "12", "--precision", "int8", "--precision", "fp16", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == set(report.model_dump())
    assert [r["precision"] for r in data["precisions"]] == ["int8", "fp16"]
    assert set(data["precisions"][0]) == set(report.precisions[0].model_dump())


def test_bad_precision_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["parity", "--precision", "fp8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'fp8'" in err and "fp32" in err and "int8" in err
    with pytest.raises(ValueError, match=r"precision 'fp8' is not one of auto, fp32, bf16, fp16, int8"):
        parity_report(precisions=("bf16", "fp8"))

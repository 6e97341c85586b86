"""The `cliplens` shell commands: in-process `main([...])`, plus `cliplens demo` as a subprocess."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from cliplens.server.cli import main

from .test_stdio_e2e import finish, isolated_env, start_cli

PROGRESS_BAR = re.compile(r"\[[#.]{30}\] (\d+)/(\d+)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def common(tiny_clip: Path, tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Flags every command gets: the tiny model, a store in tmp (never the user's), the photos folder."""
    for name in ("CLIPLENS_MODEL", "CLIPLENS_DB", "CLIPLENS_ALLOW", "CLIPLENS_DEVICE", "CLIPLENS_CHROMA_URL"):
        monkeypatch.delenv(name, raising=False)
    return ["--model", str(tiny_clip), "--db", str(tmp_path / "db"), "--device", "cpu", "--allow", str(photos)]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_index_json_is_exactly_the_structured_output(
    capsys: pytest.CaptureFixture[str], common: list[str], photos: Path
) -> None:
    code, out, err = run(capsys, "index", str(photos), "--json", *common)
    assert code == 0, err
    data = json.loads(out)  # the whole of stdout is one JSON document
    assert {"folder", "scanned", "added", "updated", "unchanged", "removed", "skipped", "skipped_count"} <= set(data)
    assert {"seconds", "images_per_second", "model", "device", "store_total"} <= set(data)
    assert (data["scanned"], data["added"], data["updated"], data["unchanged"], data["removed"]) == (4, 4, 0, 0, 0)
    assert data["folder"] == str(photos) and data["device"] == "cpu" and data["store_total"] == 4
    assert not PROGRESS_BAR.search(err)  # no progress bar in --json mode

    code, out, _ = run(capsys, "index", str(photos), "--json", *common)
    assert code == 0 and (json.loads(out)["added"], json.loads(out)["unchanged"]) == (0, 4)


def test_human_index_prints_a_summary_and_draws_progress_on_stderr(
    capsys: pytest.CaptureFixture[str], common: list[str], photos: Path
) -> None:
    code, out, err = run(capsys, "index", str(photos), *common)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out  # nothing but the summary
    assert lines[0].startswith(f"{photos}: 4 images, 4 added, 0 updated, 0 unchanged, 0 removed, 0 skipped in ")
    assert "img/s" in lines[0] and "on cpu in " in lines[0]
    bars = PROGRESS_BAR.findall(err)
    assert bars and bars[-1] == ("4", "4")
    assert not PROGRESS_BAR.search(out)


def test_human_index_lists_skipped_files(capsys: pytest.CaptureFixture[str], common: list[str], photos: Path) -> None:
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, out, err = run(capsys, "index", str(photos), *common)
    assert code == 0, err
    assert "1 skipped" in out.splitlines()[0]
    assert re.search(r"^  skipped \w+: .*broken\.png$", out, re.MULTILINE), out


def test_search_json_and_human(capsys: pytest.CaptureFixture[str], common: list[str], photos: Path) -> None:
    assert run(capsys, "index", str(photos), "--json", *common)[0] == 0

    code, out, err = run(capsys, "search", "a red square", "--top-k", "3", "--cutoff", "none", "--json", *common)
    assert code == 0, err
    data = json.loads(out)
    assert data["query"] == "a red square" and data["indexed_total"] == 4
    assert [h["rank"] for h in data["hits"]] == [1, 2, 3]
    scores = [h["score"] for h in data["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(h["path"]).is_relative_to(photos) for h in data["hits"])

    code, out, _ = run(
        capsys, "search", "yellow", "--folder", str(photos / "sub"), "--cutoff", "none", "--json", *common
    )
    assert code == 0 and [Path(h["path"]).name for h in json.loads(out)["hits"]] == ["yellow.png"]

    code, out, _ = run(capsys, "search", "a red square", "--top-k", "3", "--cutoff", "none", *common)
    assert code == 0
    rows = out.splitlines()
    assert len(rows) == 4  # three hits, then why they are or are not confident matches
    for rank, row in enumerate(rows[:3], start=1):
        assert re.fullmatch(rf"\s*{rank}  [+-]\d\.\d{{4}}  [✓ ]  {re.escape(str(photos))}/\S+", row), row
    assert "confident" in rows[3]

    code, out, _ = run(capsys, "search", "a red square", "--taken-after", "2999-01-01", "--cutoff", "none", *common)
    assert code == 0 and "2999-01-01" in out

    code, out, _ = run(capsys, "search", "a red square", "--min-score", "1", "--cutoff", "none", *common)
    assert code == 0 and "min_score" in out


def test_search_before_indexing_says_what_to_do(capsys: pytest.CaptureFixture[str], common: list[str]) -> None:
    code, out, err = run(capsys, "search", "anything", *common)
    assert code == 0, err
    assert "index" in out


def test_classify_json(capsys: pytest.CaptureFixture[str], common: list[str], photos: Path) -> None:
    images = [str(photos / "red.png"), str(photos / "blue.png")]
    code, out, err = run(capsys, "classify", *images, "--label", "a", "--label", "b", "--json", *common)
    assert code == 0, err
    data = json.loads(out)
    assert data["labels"] == ["a", "b"] and data["probability"] == "softmax"
    assert [r["image"] for r in data["results"]] == images
    for r in data["results"]:
        assert set(r["probabilities"]) == {"a", "b"} and r["top_label"] in {"a", "b"}
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["top_label"] == max(r["probabilities"], key=r["probabilities"].get)

    code, out, _ = run(
        capsys, "classify", images[0], "--label", "cat", "--label", "dog", "--template", "a drawing of a {}", *common
    )
    assert code == 0
    assert re.fullmatch(rf"{re.escape(images[0])}: (cat|dog) \(\d\.\d{{3}}\)\n", out), out


def test_explain_prints_the_matrix_and_writes_a_png_heatmap(
    capsys: pytest.CaptureFixture[str], common: list[str], photos: Path, tmp_path: Path
) -> None:
    heatmap = tmp_path / "out.png"
    names = ("red.png", "green.jpg", "blue.png")
    args = [x for n in names for x in ("--image", str(photos / n))]
    args += [x for c in ("a red square", "a green square", "a blue square") for x in ("--caption", c)]
    code, out, err = run(capsys, "explain", *args, "--heatmap", str(heatmap), *common)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["cosine", "T1", "T2", "T3"]
    for i in range(3):
        row = lines[1 + i]
        assert row.startswith(f"I{i + 1} ")
        cells = re.findall(r"[+-]\d\.\d{3}", row)
        assert len(cells) == 3 and all(-1 <= float(c) <= 1 for c in cells)
        assert re.search(rf"\[{re.escape(cells[i])}\]", row)  # the diagonal is bracketed
    assert re.fullmatch(r"loss = \d+\.\d{4}  \(.+\)", lines[4])
    assert len(lines) == 5 + 3  # one reading per image
    assert heatmap.read_bytes().startswith(PNG_MAGIC)
    with Image.open(heatmap) as img:
        assert img.format == "PNG" and img.width > 0 and img.height > 0

    code, out, _ = run(capsys, "explain", *args, "--json", *common)
    assert code == 0
    data = json.loads(out)
    assert data["n"] == 3 and len(data["cosine"]) == 3 and all(len(row) == 3 for row in data["cosine"])


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["search", "q", "--top-k", "1000"], ["top_k", "1000", "less than or equal to 100"]),
        (["search", "q", "--top-k", "0"], ["top_k", "greater than or equal to 1"]),
        (["search", "q", "--min-score", "2"], ["min_score", "less than or equal to 1"]),
        (["classify", "{photos}/red.png", "--label", "only"], ["labels", "at least 2 items"]),
        (["explain", "--image", "{photos}/red.png", "--caption", "c"], ["at least 2 items"]),
        (["index", "{tmp}/elsewhere"], ["elsewhere", "allowed"]),
        (["index", "{photos}/nope"], ["nope", "does not exist"]),
        (["classify", "{photos}/empty.png", "--label", "a", "--label", "b"], ["truncated"]),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    capsys: pytest.CaptureFixture[str],
    common: list[str],
    photos: Path,
    tmp_path: Path,
    argv: list[str],
    expect: list[str],
) -> None:
    (tmp_path / "elsewhere").mkdir()
    (photos / "empty.png").write_bytes(b"")
    argv = [a.format(photos=photos, tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv, *common)
    assert code == 2
    assert out == ""
    message = err[err.index("cliplens: error: ") :]  # model loading may draw a bar before it
    for part in expect:
        assert part in message, message
    assert "Traceback" not in err


def test_a_model_path_that_does_not_exist_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], common: list[str], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"
    code, out, err = run(capsys, "search", "q", *common, "--model", str(missing))
    assert code == 2 and out == ""
    assert err.startswith("cliplens: error: ")
    assert str(missing) in err and "--model" in err
    assert not (tmp_path / "db").exists()  # nothing was opened or created


def test_a_store_folder_that_cannot_be_created_exits_2(
    capsys: pytest.CaptureFixture[str], common: list[str], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    bad = tmp_path / "a-file" / "db"
    code, out, err = run(capsys, "search", "q", *common, "--db", str(bad))
    assert code == 2 and out == ""
    assert f"cannot open the store folder {bad}" in err and "--db" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["search", "q", "--top-k", "many"], "invalid int value: 'many'"),
        (["search", "q", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["classify", "x.png"], "--label"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argument_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], expect: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and expect in err


def test_demo_runs_offline_end_to_end(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    done = finish(start_cli(["demo", str(out_dir), "--device", "cpu"], isolated_env(tmp_path)))
    assert done.returncode == 0, done.stderr
    for name in ("contact_sheet.png", "heatmap.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("cosine"))
    assert lines[header].split() == ["cosine", "T1", "T2", "T3", "T4", "T5"]
    for i in range(5):
        row = lines[header + 1 + i]
        assert row.startswith(f"I{i + 1} ") and len(re.findall(r"[+-]\d\.\d{3}", row)) == 5, row
    assert lines[header + 6].startswith("loss = ")
    assert "search 'a photo of a red bicycle'" in done.stdout
    assert "indexed with model 'toy'" in done.stdout
    assert len(list((out_dir / "images").rglob("*.png"))) == 311
    # The bundled model finds the red bicycles it never saw in training.
    labels = {}
    for record in (out_dir / "images" / "labels.jsonl").read_text().splitlines():
        entry = json.loads(record)
        labels[entry["file"]] = {(o["color"], o["kind"]) for o in entry["objects"]}
    first_hit = next(line for line in lines if re.match(r"\s+1\. [+-]\d", line)).split()[-1]
    assert first_hit.startswith("red_bicycle_") or ("red", "bicycle") in labels.get(first_hit, set()), first_hit

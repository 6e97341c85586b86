"""The oracle of the tool fuzz (tests/test_fuzz_tools.py): a reply must be a result that keeps
every limit and matches the output schema, or an anticipated error that names what was wrong."""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
from mcp_types import CallToolResult, Tool
from PIL import Image
from pydantic import TypeAdapter

from .conftest import structured
from .fuzz_support import (
    MAX_ERROR_CHARS,
    MAX_HIT_PATH,
    MAX_JOBS_LISTED,
    MAX_LABELS,
    MAX_PAIRS,
    MAX_REPLY_CHARS,
    MAX_SKIP_TEXT,
    MAX_SKIPPED_LISTED,
    MAX_TEMPLATES,
    MAX_THUMB_SIDE,
    MAX_TOP_K,
    MAX_ZS_IMAGES,
    MIN_PAIRS,
    Sandbox,
)

# --- the oracle ----------------------------------------------------------------------------------

_JSON = TypeAdapter(dict[str, Any])


def as_received(args: dict[str, Any]) -> dict[str, Any]:
    """What the server gets: the client sends JSON, in which NaN and infinities are null."""
    return _JSON.dump_python(args, mode="json")


def _type_matches(kind: str | None, value: Any) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    return False


def _outside(sub: dict[str, Any], value: Any) -> bool:
    if isinstance(value, str):
        return not sub.get("minLength", 0) <= len(value) <= sub.get("maxLength", math.inf)
    if isinstance(value, list):
        if not sub.get("minItems", 0) <= len(value) <= sub.get("maxItems", math.inf):
            return True
        items = sub.get("items", {})
        return any(_type_matches(items.get("type"), v) and _outside(items, v) for v in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return not sub.get("minimum", -math.inf) <= value <= sub.get("maximum", math.inf)
    return False


def bound_violations(schema: dict[str, Any], args: dict[str, Any]) -> set[str]:
    """Arguments that are missing or of the right JSON type but past a limit the schema states.

    Values of the wrong type are left out: the server may coerce some ("5" for 5), and
    whatever it makes of them is checked against the limits of the result instead.
    """
    bad = {key for key in schema.get("required", []) if key not in args}
    for key, value in args.items():
        prop = schema["properties"].get(key)
        if prop is None:
            continue
        typed = [sub for sub in prop.get("anyOf", [prop]) if _type_matches(sub.get("type"), value)]
        if typed and all(_outside(sub, value) for sub in typed):
            bad.add(key)
    return bad


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def names_something(detail: str, schema: dict[str, Any], args: dict[str, Any]) -> bool:
    """Whether an error message points at an argument: by its name, or by (part of) its value."""
    if any(key in detail for key in schema["properties"]):
        return True
    for value in _strings(list(args.values())):
        if len(value) < 4:
            hints = [repr(value)]
        else:
            hints = [value[:20], repr(value)[1:21], os.path.basename(value.rstrip("/"))[:20]]
        if any(h and h in detail for h in hints):
            return True
    return False


def _images(result: CallToolResult, mime: str, *, only: bool = False) -> list[Image.Image]:
    """The image blocks of a reply, all of type `mime` (or, with `only`, those of that type)."""
    blocks = [b for b in result.content if b.type == "image" and (not only or b.mime_type == mime)]
    assert all(b.mime_type == mime for b in blocks), [b.mime_type for b in blocks]
    return [Image.open(io.BytesIO(base64.b64decode(b.data))) for b in blocks]


def _check_search(sb: Sandbox, args: dict[str, Any], out: dict[str, Any], result: CallToolResult) -> None:
    hits = out["hits"]
    top_k = args.get("top_k", 8)
    assert len(hits) <= MAX_TOP_K
    if isinstance(top_k, int | float):
        assert len(hits) <= top_k <= MAX_TOP_K
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    min_score = args.get("min_score")
    if isinstance(min_score, int | float) and not isinstance(min_score, bool):
        assert all(s >= min_score - 1e-6 for s in scores)
    assert out["searched"] and all(sb.inside(f) for f in out["searched"])
    folder = out["searched"][0]
    for hit in hits:
        assert len(hit["path"]) <= MAX_HIT_PATH and sb.inside(hit["path"])
        if args.get("folder"):
            assert hit["path"].startswith(folder + os.sep), (hit["path"], folder)
    blocks = [b.mime_type for b in result.content if b.type == "image"]
    thumbs = [b for b in blocks if b == "image/jpeg"]
    # JPEG thumbnails in rank order, then at most one PNG contact sheet.
    assert blocks == thumbs + ["image/png"] * (len(blocks) - len(thumbs)) and len(blocks) - len(thumbs) <= 1
    assert len(thumbs) <= len(hits)
    if args.get("thumbnails") is False:
        assert not blocks
    assert all(max(t.size) <= MAX_THUMB_SIDE for t in _images(result, "image/jpeg", only=True))
    assert 1 <= len(out["query"]) <= 1000
    for hit in hits:
        assert len(hit["contributions"]) == len(out["terms"])
        assert abs(sum(hit["contributions"]) - hit["score"]) < 1e-4
        if out["cutoff"] == "calibrated":
            assert hit["confident"]
    assert out["confident"] == any(h["confident"] for h in hits) or not hits


def _check_zero_shot(sb: Sandbox, args: dict[str, Any], out: dict[str, Any], result: CallToolResult) -> None:
    labels = out["labels"]
    assert 2 <= len(labels) <= MAX_LABELS and len(set(labels)) == len(labels)
    assert 1 <= len(out["templates"]) <= MAX_TEMPLATES
    assert len(out["results"]) == len(args["images"]) <= MAX_ZS_IMAGES
    for row in out["results"]:
        assert sb.inside(row["image"])
        assert list(row["probabilities"]) == labels and list(row["cosines"]) == labels
        assert row["top_label"] in labels
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-4  # the tiny CLIP: softmax
        assert all(-1.0001 <= c <= 1.0001 for c in row["cosines"].values())


def _check_explain(sb: Sandbox, args: dict[str, Any], out: dict[str, Any], result: CallToolResult) -> None:
    n = out["n"]
    assert MIN_PAIRS <= n <= MAX_PAIRS and n == len(args["images"]) == len(args["captions"])
    assert len(out["cosine"]) == n and all(len(row) == n for row in out["cosine"])
    assert all(-1.0001 <= c <= 1.0001 for row in out["cosine"] for c in row)
    assert len(out["readings"]) == n and all(sb.inside(p) for p in out["images"])
    assert len(_images(result, "image/png")) == 3  # cosine heatmap, temperature what-if, joint matrix
    assert len(out["temperature_what_if"]) == len(args.get("scales") or out["temperature_what_if"])
    assert len(out["modality_gap"]["image_image"]) == n


def _check_index(sb: Sandbox, args: dict[str, Any], out: dict[str, Any], result: CallToolResult) -> None:
    assert sb.inside(out["folder"])
    if out["status"] == "started":
        assert args.get("background") and out["job"] is not None
        sb.job_ids.append(out["job"]["job_id"])
        return
    skipped = out["skipped"]
    assert len(skipped) <= MAX_SKIPPED_LISTED and len(skipped) <= out["skipped_count"]
    for skip in skipped:
        assert len(skip["path"]) <= MAX_SKIP_TEXT and len(skip["detail"]) <= MAX_SKIP_TEXT
    assert out["added"] + out["updated"] + out["unchanged"] <= out["scanned"] + out["skipped_count"]


def _check_status(sb: Sandbox, args: dict[str, Any], out: dict[str, Any], result: CallToolResult) -> None:
    jobs = out["jobs"]
    assert len(jobs) <= MAX_JOBS_LISTED
    if isinstance(args.get("job_id"), str):
        assert [j["job_id"] for j in jobs] == [args["job_id"]]
    assert all(sb.inside(j["folder"]) for j in jobs)


def _check_compare(sb: Sandbox, args: dict[str, Any], out: dict[str, Any], result: CallToolResult) -> None:
    n = len(args["images"])
    assert len(out["images"]) == n and all(sb.inside(p) for p in out["images"])
    names = [s["name"] for s in out["sets"]]
    assert out["winner"] in names and sorted(out["ranking"]) == sorted(names) == sorted(out["table_columns"])
    for report in out["sets"]:
        assert len(report["predictions"]) == n and all(p["label"] in out["labels"] for p in report["predictions"])
        if out["truth"] is not None:
            assert report["correct"] == sum(bool(p["correct"]) for p in report["predictions"])
    assert len(out["table"]) == n and all(len(row["cells"]) == len(names) for row in out["table"])


def _check_duplicates(sb: Sandbox, args: dict[str, Any], out: dict[str, Any], result: CallToolResult) -> None:
    assert sb.inside(out["folder"])
    max_groups = args.get("max_groups", 50)
    if isinstance(max_groups, int):
        assert len(out["groups"]) <= max_groups
    threshold = out["threshold"]
    for group in out["groups"]:
        assert group["kind"] in ("exact", "near") and group["size"] >= 2 and len(group["members"]) <= 50
        assert all(sb.inside(m["path"]) for m in group["members"])
        if group["kind"] == "near":
            assert group["max_cosine"] >= threshold - 1e-5
    assert len(_images(result, "image/png")) <= 4


def _check_probes(sb: Sandbox, args: dict[str, Any], out: dict[str, Any], result: CallToolResult) -> None:
    assert out["source"] == "toy" or sb.inside(out["source"])
    assert 1 <= len(out["probes"]) <= 5
    for probe in out["probes"]:
        rows, cols = len(probe["images"]), len(probe["captions"])
        assert len(probe["cosine"]) == rows and all(len(r) == cols for r in probe["cosine"])
        assert all(-1.0001 <= c <= 1.0001 for r in probe["cosine"] for c in r)
        if out["source"] != "toy":
            assert all(len(name) <= MAX_HIT_PATH for name in probe["images"])
    assert len(_images(result, "image/png")) == len(out["probes"])


def _check_train(sb: Sandbox, args: dict[str, Any], out: dict[str, Any], result: CallToolResult) -> None:
    n = len(out["pairs"])
    assert 2 <= n <= 8 and out["steps_run"] <= out["steps_requested"]
    assert out["stopped_by"] in ("steps", "time") and len(out["loss_curve"]) in (out["steps_run"], out["steps_run"] + 1)
    for snap in out["snapshots"]:
        assert len(snap["cosine"]) == n and all(len(r) == n for r in snap["cosine"])
    assert all(sb.inside(p["image"]) for p in out["pairs"] if out["source"] == "user")
    assert len(_images(result, "image/png")) == 2


LIMITS: dict[str, Callable[[Sandbox, dict[str, Any], dict[str, Any], CallToolResult], None]] = {
    "compare_prompts": _check_compare,
    "find_duplicates": _check_duplicates,
    "probe_failure_modes": _check_probes,
    "train_contrastive_demo": _check_train,
    "search_images": _check_search,
    "zero_shot_classify": _check_zero_shot,
    "explain_similarity_matrix": _check_explain,
    "index_folder": _check_index,
    "index_status": _check_status,
}


def check_reply(tool: Tool, sb: Sandbox, sent: dict[str, Any], result: CallToolResult, must_succeed: bool) -> None:
    args = as_received(sent)
    text = " ".join(getattr(b, "text", "") for b in result.content)
    assert len(text) + sum(len(getattr(b, "data", "")) for b in result.content) <= MAX_REPLY_CHARS
    bad = bound_violations(tool.input_schema, args)
    if must_succeed:
        assert not result.is_error, f"valid arguments refused: {text[:2000]}"
    if bad:
        assert result.is_error, f"{sorted(bad)} past a limit, yet the call succeeded"
    if not result.is_error:
        out = structured(result)
        jsonschema.validate(out, tool.output_schema or {})
        LIMITS[tool.name](sb, args, out, result)
        return
    prefix = f"Error executing tool {tool.name}: "
    # The SDK hides a crash (an exception the tool did not expect) behind its bare prefix.
    assert text.startswith(prefix) and len(text) > len(prefix), f"the tool crashed: {text!r}"
    detail = text[len(prefix) :]
    assert len(text) <= MAX_ERROR_CHARS and "Traceback" not in text
    if bad:
        assert any(key in detail for key in bad), f"{sorted(bad)} not named in: {detail[:500]}"
    else:
        assert names_something(detail, tool.input_schema, args), f"names no argument: {detail[:500]}"

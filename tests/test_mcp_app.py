"""The MCP App viewer: its binding and resource over MCP, graceful degradation, and the page itself
driven in headless Chromium by a test host that plays the host side of the postMessage protocol
with real tool results."""

from __future__ import annotations

import html
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.extension import advertise
from mcp_types import CallToolResult

from cliplens.server.app import build_server
from cliplens.server.config import Settings
from cliplens.tools.ui_app import APP_MIME_TYPE, EXTENSION_ID, UI_TOOLS, VIEWER_URI, viewer_html

from .conftest import connect, make_image, structured

HOSTILE_NAME = "<img src=x onerror=parent.pwned=1>.png"
HOSTILE_CAPTION = '<b id="bold">bold</b> & "quoted" <script>parent.pwned=2</script>'
APPS_CLIENT = advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})
INSTALL_HINT = "chromium is not installed: run `apt-get install -y chromium` (CI does this in .ci/run)"


async def test_ui_tools_point_at_a_served_viewer(settings: Settings) -> None:
    async with connect(settings) as client:
        assert EXTENSION_ID in (client.server_capabilities.extensions or {})
        tools = {t.name: t for t in (await client.list_tools()).tools}
        for name, tool in tools.items():
            ui = (tool.meta or {}).get("ui")
            if name in UI_TOOLS:
                assert ui == {"resourceUri": VIEWER_URI}, name
                assert tool.meta and tool.meta["ui/resourceUri"] == VIEWER_URI  # the key older hosts read
            else:
                assert ui is None, name
        assert set(tools) >= UI_TOOLS
        listed = {str(r.uri): r for r in (await client.list_resources()).resources}
        assert listed[VIEWER_URI].mime_type == APP_MIME_TYPE
        read = await client.read_resource(VIEWER_URI)
        (content,) = read.contents
        assert content.mime_type == APP_MIME_TYPE
        page = getattr(content, "text", "")
        assert page == viewer_html() and "ui/initialize" in page
    # Self-contained and CSP-friendly: nothing fetched from the network, no string evaluation, no markup from data.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the viewer must not load anything remote"
    for banned in ("eval(", "new Function", "innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert banned not in page, banned


async def test_clients_without_apps_get_the_same_results(settings: Settings, photos: Path) -> None:
    images = [str(photos / "red.png"), str(photos / "green.jpg")]
    calls: list[tuple[str, dict[str, Any]]] = [
        ("search_images", {"query": "a red square", "top_k": 3, "cutoff": "none"}),
        ("explain_similarity_matrix", {"images": images, "captions": ["a red square", "a green square"]}),
    ]
    answers: list[list[CallToolResult]] = []
    for extensions in ([APPS_CLIENT], None):  # one after the other: each server takes the store's lock
        async with Client(build_server(settings), extensions=extensions) as client:
            structured(await client.call_tool("index_folder", {"path": str(photos)}))
            answers.append([await client.call_tool(name, args) for name, args in calls])
    with_apps, without = answers
    for a, b in zip(with_apps, without, strict=True):
        assert structured(a) == structured(b)
        assert [block.type for block in a.content] == [block.type for block in b.content]
        assert [getattr(x, "data", None) for x in a.content] == [getattr(x, "data", None) for x in b.content]
    thumbs = [b for b in with_apps[0].content if b.type == "image" and b.mime_type == "image/jpeg"]
    assert len(thumbs) == len(structured(with_apps[0])["hits"]) == 3  # one thumbnail per hit


# The host side of the protocol: answer ui/initialize, send tool-input and tool-result once the view
# says it is initialized, then read the view's DOM (same origin: srcdoc), drive hover/click/toggle and
# write what it saw into #report for --dump-dom.
HOST_SCRIPT = r"""
const DATA = JSON.parse(document.getElementById("data").textContent);
const report = {};
let open = 0;
function finish() { if (--open === 0) document.getElementById("report").textContent = JSON.stringify(report); }
function texts(doc, selector) { return Array.from(doc.querySelectorAll(selector), (n) => n.textContent); }
function inspectGallery(doc) {
  return {
    view: doc.getElementById("app").dataset.view,
    cards: Array.from(doc.querySelectorAll(".card"), (card) => ({
      rank: card.querySelector(".rank").textContent,
      score: card.querySelector(".score").textContent,
      path: card.querySelector(".path").textContent,
      imgs: Array.from(card.querySelectorAll("img"), (img) => img.getAttribute("src").slice(0, 23)),
      extra: texts(card, "dt"),
      verdict: (card.querySelector(".verdict") || {}).textContent,
    })),
    sheets: Array.from(doc.querySelectorAll("figure.sheet img"), (img) => img.getAttribute("src").slice(0, 22)),
    notes: texts(doc, ".note"),
    title: doc.querySelector("h1").textContent,
    hostileImgs: doc.querySelectorAll("img[src='x']").length,
  };
}
function inspectMatrix(doc, win) {
  const out = { view: doc.getElementById("app").dataset.view };
  out.heads = Array.from(doc.querySelectorAll("th"), (t) => t.title);
  out.rows = doc.querySelectorAll("table.matrix tr").length;
  out.cells = doc.querySelectorAll("table.matrix td").length;
  out.diag = Array.from(doc.querySelectorAll("td.diag"), (td) => td.dataset.i + "," + td.dataset.j);
  out.views = {};
  for (const button of doc.querySelectorAll(".toggle button")) {
    button.click();
    const colours = new Set(Array.from(doc.querySelectorAll("table.matrix td"), (td) => td.style.backgroundColor));
    const pressed = button.getAttribute("aria-pressed");
    out.views[button.dataset.view] = { pressed, cells: texts(doc, "table.matrix td"), colours: colours.size };
  }
  out.scales = {};
  for (const button of doc.querySelectorAll(".scales button")) {
    button.click();
    doc.querySelector(".toggle button[data-view='image_to_text']").click();
    const reading = doc.querySelector(".scale-reading").textContent;
    out.scales[button.dataset.scale] = { cells: texts(doc, "table.matrix td"), reading };
  }
  for (const button of doc.querySelectorAll(".scales button")) {
    if (button.textContent.endsWith("(model)")) button.click();
  }
  const cell = (i, j) => doc.querySelector(`td[data-i="${i}"][data-j="${j}"]`);
  cell(1, 2).dispatchEvent(new win.MouseEvent("mouseover", { bubbles: true }));
  const d = doc.querySelector(".detail");
  out.hover = { i: d.dataset.i, j: d.dataset.j, path: d.querySelector(".path").textContent,
    caption: d.querySelector(".caption").textContent, numbers: texts(d, "dd") };
  cell(2, 0).dispatchEvent(new win.MouseEvent("click", { bubbles: true }));
  cell(0, 0).dispatchEvent(new win.MouseEvent("mouseover", { bubbles: true }));
  doc.querySelector("table.matrix").dispatchEvent(new win.MouseEvent("mouseleave"));
  out.pinned = { i: d.dataset.i, j: d.dataset.j, selected: doc.querySelectorAll("td.selected").length,
    caption: d.querySelector(".caption").textContent, numbers: texts(d, "dd") };
  out.bold = doc.querySelectorAll("b").length + doc.querySelectorAll("script").length - 1; // the view's own script
  out.readings = texts(doc, ".readings li").length;
  out.legend = texts(doc, ".legend li");
  out.figures = doc.querySelectorAll("figure img").length;
  return out;
}
function mount(name, call, inspect) {
  open++;
  const frame = document.createElement("iframe");
  const seen = (report[name] = { messages: [] });
  const reply = (msg) => frame.contentWindow.postMessage(Object.assign({ jsonrpc: "2.0" }, msg), "*");
  window.addEventListener("message", (event) => {
    if (event.source !== frame.contentWindow) return;
    const msg = event.data;
    seen.messages.push(msg.method || "response:" + msg.id);
    if (msg.method === "ui/initialize") {
      seen.init = msg.params;
      const hostInfo = { name: "test-host", version: "1" };
      const version = msg.params.protocolVersion;
      const hostContext = { theme: "dark" };
      reply({ id: msg.id, result: { protocolVersion: version, hostInfo, hostCapabilities: {}, hostContext } });
    } else if (msg.method === "ui/notifications/initialized") {
      reply({ method: "ui/notifications/tool-input", params: { arguments: call.arguments } });
      reply({ method: "ui/notifications/tool-result", params: call.result });
      setTimeout(() => {
        seen.theme = frame.contentDocument.documentElement.dataset.theme;
        seen.dom = inspect(frame.contentDocument, frame.contentWindow);
        reply({ id: 99, method: "ui/resource-teardown", params: {} });
      }, 100);
    } else if (msg.id === 99 && msg.method === undefined) {
      seen.teardown = msg.result;
      seen.pwned = window.pwned === undefined ? null : window.pwned;
      finish();
    }
  });
  frame.srcdoc = DATA.app;
  document.body.append(frame);
}
mount("gallery", DATA.search, inspectGallery);
mount("matrix", DATA.matrix, inspectMatrix);
mount("bare", DATA.bare, inspectGallery);
"""


def host_page(app: str, **calls: dict[str, Any]) -> str:
    data = json.dumps({"app": app, **calls})
    data = data.replace("<", "\\u003c")  # the JSON sits in a <script> block: no "</script>" may appear in it
    return (
        '<!doctype html><html><body><pre id="report"></pre>'
        f'<script type="application/json" id="data">{data}</script>'
        f"<script>{HOST_SCRIPT}</script></body></html>"
    )


def wire(result: CallToolResult) -> dict[str, Any]:
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


async def test_viewer_renders_results_in_chromium(settings: Settings, photos: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(INSTALL_HINT)
    hostile = make_image(photos / HOSTILE_NAME, (200, 40, 40))
    matrix_images = [str(photos / "red.png"), str(photos / "green.jpg"), str(hostile)]
    captions = ["a red square", "a green square", HOSTILE_CAPTION]
    search_args = {"query": "a red square", "top_k": 5, "cutoff": "none"}  # all five, each flagged
    async with connect(settings) as client:
        structured(await client.call_tool("index_folder", {"path": str(photos)}))
        page = (await client.read_resource(VIEWER_URI)).contents[0]
        search = await client.call_tool("search_images", search_args)
        matrix = await client.call_tool("explain_similarity_matrix", {"images": matrix_images, "captions": captions})
        bare = await client.call_tool("search_images", {**search_args, "thumbnails": False})
    hits, lesson = structured(search)["hits"], structured(matrix)
    assert len(hits) == 5 and HOSTILE_NAME in {Path(h["path"]).name for h in hits}

    host = tmp_path / "host.html"
    host.write_text(
        host_page(
            getattr(page, "text", ""),
            search={"arguments": search_args, "result": wire(search)},
            matrix={"arguments": {"captions": captions}, "result": wire(matrix)},
            bare={"arguments": search_args, "result": wire(bare)},
        ),
        encoding="utf-8",
    )
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        host.as_uri(),
    ]
    started = time.monotonic()
    done = await anyio.run_process(command, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    found = re.search(r'<pre id="report">(.*?)</pre>', done.stdout.decode())
    assert found and found.group(1), f"the host page saw no report in {time.monotonic() - started:.1f} s"
    report = json.loads(html.unescape(found.group(1)))

    for name in ("gallery", "matrix", "bare"):
        seen = report[name]
        assert seen["messages"][:2] == ["ui/initialize", "ui/notifications/initialized"], seen["messages"]
        assert seen["init"]["appInfo"]["name"] == "cliplens-viewer" and seen["init"]["protocolVersion"]
        assert "ui/notifications/size-changed" in seen["messages"]
        assert seen["teardown"] == {} and seen["theme"] == "dark"
        assert seen["pwned"] is None, "markup from a path or caption ran as script"

    gallery = report["gallery"]["dom"]
    assert gallery["view"] == "gallery" and gallery["title"] == "Search: “a red square”"
    assert gallery["hostileImgs"] == 0
    assert [(c["rank"], c["score"], c["path"]) for c in gallery["cards"]] == [
        (f"#{h['rank']}", f"{h['score']:.3f}", h["path"]) for h in hits
    ]
    assert all(c["imgs"] == ["data:image/jpeg;base64,"] for c in gallery["cards"])
    found = structured(search)
    assert [c["verdict"] for c in gallery["cards"]] == [" · confident" if h["confident"] else " · weak" for h in hits]
    assert all({"margin over null", "contributions"} <= set(c["extra"]) for c in gallery["cards"])
    sheets = [b for b in search.content if b.type == "image" and b.mime_type != "image/jpeg"]
    assert gallery["sheets"] == ["data:image/png;base64,"] * len(sheets)
    assert any(found["why"] in note for note in gallery["notes"])
    # Without thumbnails the cards are the same, with no picture.
    without = report["bare"]["dom"]
    assert [c["path"] for c in without["cards"]] == [h["path"] for h in hits]
    assert all(c["imgs"] == [] for c in without["cards"])

    shown = report["matrix"]["dom"]
    n = lesson["n"]
    assert shown["view"] == "matrix" and shown["rows"] == n + 1 and shown["cells"] == n * n
    assert shown["diag"] == [f"{i},{i}" for i in range(n)]
    assert shown["heads"][1 : n + 1] == captions and shown["heads"][n + 1 :] == lesson["images"]
    assert shown["views"]["cosine"]["cells"] == [f"{v:.3f}" for row in lesson["cosine"] for v in row]
    for key in ("image_to_text", "text_to_image"):
        assert shown["views"][key]["pressed"] == "true"
        assert shown["views"][key]["cells"] == [f"{v * 100:.1f}%" for row in lesson[key] for v in row]
        assert shown["views"][key]["colours"] > 1  # coloured by value, not one flat shade
    assert shown["hover"]["i"] == "1" and shown["hover"]["j"] == "2"
    assert shown["hover"]["path"] == lesson["images"][1] and shown["hover"]["caption"] == f"“{HOSTILE_CAPTION}”"
    assert shown["hover"]["numbers"] == [
        f"{lesson['cosine'][1][2]:.4f}",
        f"{lesson['logits'][1][2]:.3f}",
        f"{lesson['image_to_text'][1][2] * 100:.1f}%",
        f"{lesson['text_to_image'][1][2] * 100:.1f}%",
    ]
    # A click pins the cell: leaving the table shows the pinned one again, not the last hovered.
    assert (shown["pinned"]["i"], shown["pinned"]["j"], shown["pinned"]["selected"]) == ("2", "0", 1)
    assert shown["pinned"]["caption"] == "“a red square”"
    assert shown["bold"] == 0 and shown["readings"] == n
    assert shown["legend"] == [f"I{i + 1} = {p}" for i, p in enumerate(lesson["images"])] + [
        f"T{j + 1} = “{c}”" for j, c in enumerate(captions)
    ]
    assert shown["figures"] == len([b for b in matrix.content if b.type == "image"])
    # Each temperature what-if redraws the probability view with that scale's matrix and reading.
    what_ifs = lesson["temperature_what_if"]
    assert len(shown["scales"]) == len(what_ifs) > 1
    for w in what_ifs:
        picked = shown["scales"][_js_number(w["scale"])]
        assert picked["cells"] == [f"{v * 100:.1f}%" for row in w["image_to_text"] for v in row]
        assert picked["reading"] == w["reading"]


def _js_number(value: float) -> str:
    """String(value) in JavaScript: integers print without a trailing '.0'."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))

"""The MCP App (io.modelcontextprotocol/ui) that shows search results and the similarity matrix.

Hosts that negotiated MCP Apps render the `ui://` resource in a sandboxed iframe and feed it the
tool's result; every other client gets the very same structured result and images, so the tools
do not branch on client support. One self-contained HTML page serves both tools: it tells a
search result (`hits`) from a matrix (`cosine`) by its shape.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID, Apps

__all__ = ["APP_MIME_TYPE", "EXTENSION_ID", "UI_TOOLS", "VIEWER_URI", "apps_extension", "tool_meta", "viewer_html"]

VIEWER_URI = "ui://cliplens/viewer.html"
UI_TOOLS = frozenset({"search_images", "explain_similarity_matrix"})


@cache
def viewer_html() -> str:
    return files("cliplens.tools").joinpath("ui", "viewer.html").read_text(encoding="utf-8")


def tool_meta(name: str) -> dict[str, Any] | None:
    """The `_meta` binding a tool to the viewer, or None for tools without a UI."""
    if name not in UI_TOOLS:
        return None
    # "ui/resourceUri" is the flat key that hosts written before the nested `ui` object still read.
    return {"ui": {"resourceUri": VIEWER_URI}, "ui/resourceUri": VIEWER_URI}


def apps_extension() -> Apps:
    """The Apps extension: advertises the capability and serves the viewer. The tools themselves
    are registered with the others (see tools.register_tools), carrying `tool_meta`."""
    apps = Apps()
    apps.add_html_resource(
        VIEWER_URI,
        viewer_html(),
        name="cliplens-viewer",
        title="cliplens viewer",
        description="Gallery of search_images hits and the interactive explain_similarity_matrix view.",
        prefers_border=True,
    )
    return apps

"""cliplens.tools: one module per MCP tool, each a pure core function plus a thin handler."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer

from . import explain_similarity_matrix, index_folder, index_status, search_images, zero_shot_classify

TOOL_MODULES = {
    "index_folder": index_folder,
    "index_status": index_status,
    "search_images": search_images,
    "zero_shot_classify": zero_shot_classify,
    "explain_similarity_matrix": explain_similarity_matrix,
}


def register_tools(server: MCPServer[Any]) -> None:
    for name, module in TOOL_MODULES.items():
        server.add_tool(module.handle, name=name, description=module.DESCRIPTION, annotations=module.ANNOTATIONS)

"""cliplens.tools: one module per MCP tool, each a pure core function plus a thin handler."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer

from . import (
    compare_prompts,
    explain_similarity_matrix,
    find_duplicates,
    index_folder,
    index_status,
    probe_failure_modes,
    search_images,
    train_contrastive_demo,
    ui_app,
    zero_shot_classify,
)

TOOL_MODULES = {
    "index_folder": index_folder,
    "index_status": index_status,
    "search_images": search_images,
    "find_duplicates": find_duplicates,
    "zero_shot_classify": zero_shot_classify,
    "compare_prompts": compare_prompts,
    "explain_similarity_matrix": explain_similarity_matrix,
    "train_contrastive_demo": train_contrastive_demo,
    "probe_failure_modes": probe_failure_modes,
}


def register_tools(server: MCPServer[Any]) -> None:
    for name, module in TOOL_MODULES.items():
        server.add_tool(
            module.handle,
            name=name,
            description=module.DESCRIPTION,
            annotations=module.ANNOTATIONS,
            meta=ui_app.tool_meta(name),  # the MCP App view, for hosts that render one
        )

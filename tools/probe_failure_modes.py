"""probe_failure_modes: being written (this placeholder is replaced before anything lands)."""

from __future__ import annotations

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

DESCRIPTION = "probe_failure_modes (being written)"


async def handle(ctx: Context) -> str:
    raise ToolError("probe_failure_modes is being written")


ANNOTATIONS = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

"""The thin edge between the pure tool cores and MCP: threads, errors, progress, results."""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent
from pydantic import BaseModel, ValidationError

from ..server.app import AppContext
from ..server.encoder import ModelLoadError
from ..server.images import ImageRejected
from ..server.paths import is_utf8, shown
from ..server.store import StoreError

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# Failures the caller can act on: their messages go back to the model as they are.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, StoreError, ModelLoadError, ImageRejected)


def engine(ctx: Context) -> AppContext:
    return cast(AppContext, ctx.request_context.lifespan_context)


async def run_core(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a blocking core function in a worker thread; turn expected errors into ToolError."""
    try:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
    except EXPECTED_ERRORS as exc:
        raise ToolError(str(exc)) from exc


def progress_reporter(ctx: Context) -> Callable[[int, int, str], None]:
    """A callback the worker thread can call to send MCP progress notifications."""

    def report(done: int, total: int, message: str) -> None:
        anyio.from_thread.run(ctx.report_progress, done, total, message)

    return report


def check_cancelled() -> None:
    """Raise inside the worker thread once the client has cancelled the request."""
    anyio.from_thread.check_cancelled()


def image_block(data: bytes, mime: str) -> ImageContent:
    return ImageContent(type="image", data=base64.b64encode(data).decode("ascii"), mime_type=mime)


def tool_result(output: BaseModel, images: Sequence[ContentBlock] = ()) -> CallToolResult:
    """Structured output (the tool's output schema) plus its JSON text and any images."""
    text = TextContent(type="text", text=output.model_dump_json())
    return CallToolResult(content=[text, *images], structured_content=output.model_dump(mode="json"))


def _reject_unpaired_surrogates(name: str, value: Any) -> None:
    # JSON can spell a lone surrogate ("\\udce9"); such text is not Unicode, cannot be
    # tokenised or written back out as JSON, and could smuggle undecodable bytes into a path.
    if isinstance(value, str):
        if not is_utf8(value):
            raise ToolError(f"{name} {shown(value, 80)!r} holds an unpaired surrogate, which is not valid Unicode text")
    elif isinstance(value, list | tuple):
        for item in value:
            _reject_unpaired_surrogates(name, item)


def parse(model: type[M], **fields: Any) -> M:
    """Build a tool's input model; a rule it breaks comes back as a ToolError naming the value."""
    for name, value in fields.items():
        _reject_unpaired_surrogates(name, value)
    try:
        return model(**fields)
    except ValidationError as exc:
        raise ToolError(str(exc)) from exc

"""cliplens.prompts: the zero-shot template ensemble and the MCP prompts.

The prompt texts live next to this file as markdown. User arguments are substituted with
`str.replace` (the texts contain JSON braces, so no `str.format`), and only into one plain
data slot: as a JSON string literal, with control, format and separator characters escaped.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Callable
from importlib.resources import files
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer, UserMessage
from mcp.server.mcpserver.prompts.base import Prompt
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from pydantic import Field

MAX_ARG_CHARS = 4096
TOPICS = ("all", "encoders", "matrix", "loss", "temperature", "zero_shot", "failures")
_PACKAGE = __package__ or __name__
_SECTION = re.compile(r"^<!-- section: ([a-z_]+) -->[ \t]*\n", re.MULTILINE)


@functools.cache
def _read(name: str) -> str:
    return files(_PACKAGE).joinpath(name).read_text(encoding="utf-8")


@functools.cache
def _templates() -> tuple[str, ...]:
    templates = json.loads(_read("zero_shot_templates.json"))["templates"]
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise RuntimeError("zero_shot_templates.json: 'templates' must be strings with exactly one '{}'")
    return tuple(templates)


def default_templates() -> list[str]:
    """The default zero-shot prompt ensemble; a fresh list each call (safe to mutate)."""
    return list(_templates())


def _show(value: str, limit: int = 80) -> str:
    """A short, quoted rendering of a user value for error messages."""
    return repr(value[:limit] + "…") if len(value) > limit else repr(value)


def _as_data(value: str) -> str:
    """`value` as a one-line JSON string literal, with invisible or line-breaking characters escaped."""
    text = json.dumps(value, ensure_ascii=False)
    return "".join(json.dumps(ch)[1:-1] if ch != " " and unicodedata.category(ch)[0] in "CZ" else ch for ch in text)


def _checked(name: str, value: str) -> str:
    if len(value) > MAX_ARG_CHARS:
        raise ValueError(f"{name} is {len(value)} characters long; the limit is {MAX_ARG_CHARS}")
    if not value.strip():
        raise ValueError(f"{name} must not be blank")
    return value


def red_bicycle_search_text(folder: str) -> str:
    """The walk-through text with `folder` in its data slot."""
    return _read("red_bicycle_search.md").replace("{folder}", _as_data(_checked("folder", folder)))


@functools.cache
def _sections() -> tuple[str, dict[str, str]]:
    preamble, *rest = _SECTION.split(_read("how_clip_works.md"))
    sections = {key: body.strip() for key, body in zip(rest[::2], rest[1::2], strict=True)}
    if tuple(sections) != TOPICS[1:]:
        raise RuntimeError(f"how_clip_works.md: sections {list(sections)} do not match {list(TOPICS[1:])}")
    return preamble.strip(), sections


def how_clip_works_text(topic: str = "all") -> str:
    """The lesson: the preamble plus one section, or all of them for "all".

    Raises:
        ValueError: `topic` is not one of TOPICS.
    """
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {_show(topic)}; choose one of: {', '.join(TOPICS)}")
    preamble, sections = _sections()
    chosen = list(sections.values()) if topic == "all" else [sections[topic]]
    return "\n\n".join([preamble, *chosen]) + "\n"


def _user_message(render: Callable[[str], str], arg: str) -> list[UserMessage]:
    # A plain ValueError would reach the client as "Error rendering prompt ..."; an MCPError keeps the reason.
    try:
        return [UserMessage(render(arg))]
    except ValueError as exc:
        raise MCPError(INVALID_PARAMS, str(exc)) from exc


Folder = Annotated[str, Field(description=f"The image folder to index and search (at most {MAX_ARG_CHARS} chars)")]
Topic = Annotated[str, Field(description=f"Which part of the lesson: one of {', '.join(TOPICS)}")]


def _red_bicycle_search(folder: Folder) -> list[UserMessage]:
    return _user_message(red_bicycle_search_text, folder)


def _how_clip_works(topic: Topic = "all") -> list[UserMessage]:
    return _user_message(how_clip_works_text, topic)


def register_prompts(server: MCPServer[Any]) -> None:
    """Register the `red_bicycle_search` and `how_clip_works` prompts on `server`."""
    server.add_prompt(
        Prompt.from_function(
            _red_bicycle_search,
            name="red_bicycle_search",
            title="Search a folder for a red bicycle",
            description=(
                "A guided demo: index a folder, search it for 'a photo of a red bicycle', read the scores, "
                "classify the top hits zero-shot, show the similarity matrix, and see where CLIP fails."
            ),
        )
    )
    server.add_prompt(
        Prompt.from_function(
            _how_clip_works,
            name="how_clip_works",
            title="How CLIP works",
            description=(
                "A compact lesson on CLIP: the two encoders, the N×N similarity matrix, the contrastive "
                "loss, the learned temperature, zero-shot classification and retrieval, where CLIP fails. "
                f"topic picks one section: {', '.join(TOPICS)}."
            ),
        )
    )

"""cliplens.prompts: the zero-shot template ensemble, compare_prompts' default sets, the MCP prompts.

The prompt texts live next to this file as markdown: the red-bicycle walk-through, the compact
lesson (how_clip_works) and the six-step lesson path (LESSONS), each step telling the assistant
to run the tools live. User arguments are substituted with `str.replace` (the texts contain
JSON braces, so no `str.format`), and only into one plain data slot: as a JSON string
literal, with control, format and separator characters escaped.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
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


@functools.cache
def _prompt_sets() -> tuple[tuple[str, tuple[str, ...]], ...]:
    sets = json.loads(_read("prompt_sets.json"))["sets"]
    loaded = []
    for name, spec in sets.items():
        if isinstance(spec, dict):
            if spec != {"templates_from": "zero_shot_templates.json"}:
                raise RuntimeError(f"prompt_sets.json: set {name!r} may only take templates_from zero_shot_templates")
            templates = _templates()
        else:
            templates = tuple(spec)
        if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise RuntimeError(f"prompt_sets.json: set {name!r} must hold strings with exactly one '{{}}'")
        loaded.append((name, templates))
    return tuple(loaded)


def default_prompt_sets() -> dict[str, list[str]]:
    """compare_prompts' default template sets, by name, in order; fresh lists each call."""
    return {name: list(templates) for name, templates in _prompt_sets()}


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


def _split_sections(name: str) -> tuple[str, dict[str, str]]:
    """A markdown file's text before its first `<!-- section: key -->` marker, and each section by key."""
    preamble, *rest = _SECTION.split(_read(name))
    return preamble.strip(), {key: body.strip() for key, body in zip(rest[::2], rest[1::2], strict=True)}


@functools.cache
def _sections() -> tuple[str, dict[str, str]]:
    preamble, sections = _split_sections("how_clip_works.md")
    if tuple(sections) != TOPICS[1:]:
        raise RuntimeError(f"how_clip_works.md: sections {list(sections)} do not match {list(TOPICS[1:])}")
    return preamble, sections


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


@dataclass(frozen=True)
class Lesson:
    name: str  # the MCP prompt name; its text is prompts/<name>.md
    title: str
    description: str


LESSONS: tuple[Lesson, ...] = (
    Lesson(
        "lesson_1_why_labels_stopped_scaling",
        "Lesson 1: why fixed labels stopped scaling",
        "Fixed label sets against captions from the web, and zero-shot classification shown live with "
        "zero_shot_classify and compare_prompts.",
    ),
    Lesson(
        "lesson_2_matrix_by_hand",
        "Lesson 2: build the similarity matrix by hand",
        "Five image-caption pairs: read the 5×5 matrix, the loss and the temperature with "
        "explain_similarity_matrix, then watch training light up the diagonal with train_contrastive_demo.",
    ),
    Lesson(
        "lesson_3_zero_shot_is_retrieval",
        "Lesson 3: zero-shot classification and retrieval are one operation",
        "search_images and zero_shot_classify are the same dot product read along a column or a row; "
        "shown live on the same images.",
    ),
    Lesson(
        "lesson_4_clip_in_diffusion",
        "Lesson 4: how diffusion models use CLIP-style text vectors",
        "Text-encoder conditioning, guidance and negative prompts; the text vector space explored live "
        "with search_images' query arithmetic.",
    ),
    Lesson(
        "lesson_5_failure_modes",
        "Lesson 5: where CLIP fails",
        "Counting, negation, word order and space, binding, rendered words: measured live with "
        "probe_failure_modes and search_images' negation warnings.",
    ),
    Lesson(
        "lesson_6_design_red_bicycle_search",
        "Lesson 6: design the red-bicycle search end to end",
        "index_folder, search_images with its calibrated confidence, filters and query arithmetic, "
        "find_duplicates and a contact sheet: a search a user can trust.",
    ),
)
LESSON_NAMES = tuple(lesson.name for lesson in LESSONS)


@functools.cache
def _folder_slots() -> dict[str, str]:
    _, slots = _split_sections("lesson_folder.md")
    if set(slots) != {"given", "missing"}:
        raise RuntimeError(f"lesson_folder.md: sections {list(slots)} must be 'given' and 'missing'")
    return slots


def lesson_text(name: str, folder: str | None = None) -> str:
    """One step of the lesson path, with the folder as data, or how to get one when it is absent.

    A blank folder counts as absent: clients often send "" for an optional argument left empty.

    Raises:
        ValueError: `name` is not in LESSON_NAMES, or `folder` is over MAX_ARG_CHARS.
    """
    if name not in LESSON_NAMES:
        raise ValueError(f"unknown lesson {_show(name)}; choose one of: {', '.join(LESSON_NAMES)}")
    slots = _folder_slots()
    if folder is None or not folder.strip():
        slot = slots["missing"]
    else:
        slot = slots["given"].replace("{folder}", _as_data(_checked("folder", folder)))
    return _read(f"{name}.md").replace("{folder}", slot)


def _user_message(render: Callable[[], str]) -> list[UserMessage]:
    # A plain ValueError would reach the client as "Error rendering prompt ..."; an MCPError keeps the reason.
    try:
        return [UserMessage(render())]
    except ValueError as exc:
        raise MCPError(INVALID_PARAMS, str(exc)) from exc


Folder = Annotated[str, Field(description=f"The image folder to index and search (at most {MAX_ARG_CHARS} chars)")]
OptionalFolder = Annotated[
    str | None,
    Field(description=f"Optional: a folder of images the server may read (at most {MAX_ARG_CHARS} chars)"),
]
Topic = Annotated[str, Field(description=f"Which part of the lesson: one of {', '.join(TOPICS)}")]


def _red_bicycle_search(folder: Folder) -> list[UserMessage]:
    return _user_message(lambda: red_bicycle_search_text(folder))


def _how_clip_works(topic: Topic = "all") -> list[UserMessage]:
    return _user_message(lambda: how_clip_works_text(topic))


def _lesson_prompt(name: str) -> Callable[..., list[UserMessage]]:
    def render(folder: OptionalFolder = None) -> list[UserMessage]:
        return _user_message(lambda: lesson_text(name, folder))

    return render


def register_prompts(server: MCPServer[Any]) -> None:
    """Register `red_bicycle_search`, `how_clip_works` and the LESSONS on `server`."""
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
    for lesson in LESSONS:
        server.add_prompt(
            Prompt.from_function(
                _lesson_prompt(lesson.name), name=lesson.name, title=lesson.title, description=lesson.description
            )
        )

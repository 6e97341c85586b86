"""Shared ground for the fuzz tests (tests/test_fuzz_tools.py, tests/test_fuzz_images.py).

Example counts and Hypothesis settings, the tools' limits as the tests read them, the audit hook
that records every file the process opens or lists, the sandbox the tool fuzz runs in, and the
harness that drives the server through a blocking portal. Argument strategies are in
tests/fuzz_strategies.py; the oracle that checks replies is in tests/fuzz_checks.py.

CLIPLENS_FUZZ_EXAMPLES=N runs N examples per tool and per image format instead of the CI default;
`pytest -s` prints how many ran.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from mcp import Client
from mcp_types import CallToolResult

from cliplens.server.config import Settings

from .conftest import connect

DEFAULT_TOOL_EXAMPLES = 30
DEFAULT_DECODE_EXAMPLES = 100
_ENV_EXAMPLES = int(os.environ.get("CLIPLENS_FUZZ_EXAMPLES") or 0)
TOOL_EXAMPLES = _ENV_EXAMPLES or DEFAULT_TOOL_EXAMPLES
DECODE_EXAMPLES = _ENV_EXAMPLES or DEFAULT_DECODE_EXAMPLES

CALL_TIMEOUT = 120.0  # seconds: a hang fails the example instead of stalling the run
MAX_REPLY_CHARS = 4 * 1024 * 1024  # text plus base64 images of one reply
MAX_ERROR_CHARS = 64 * 1024
# The tools' own limits, as the tests read them (not imported: a limit that drifts must fail here).
MAX_TOP_K, MAX_HIT_PATH, MAX_THUMB_SIDE = 100, 1024, 256
MAX_ZS_IMAGES, MAX_LABELS, MAX_TEMPLATES = 32, 100, 32
MIN_PAIRS, MAX_PAIRS = 2, 16
MAX_SKIPPED_LISTED, MAX_SKIP_TEXT = 50, 300
MAX_JOBS_LISTED = 20


def _hypothesis(examples: int) -> hsettings:
    # derandomize: CI runs the same examples every time; no database, so nothing is written
    # beside the checkout and a run does not depend on the last one. The health checks are about
    # generation speed and data size, which the hostile strategies stretch on purpose.
    return hsettings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )


# --- watching what the process opens ------------------------------------------------------


class OpenRecorder:
    """File opens and folder listings (audit events) made by any thread while armed.

    Audit hooks cannot be removed, so one is installed for the process and costs one
    attribute read per event while disarmed.
    """

    WATCHED = frozenset({"open", "os.scandir", "os.listdir"})

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, str]] | None = None

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        events = self.events
        if events is None or event not in self.WATCHED:
            return
        try:
            path = args[0] if args else None
            if path is None or isinstance(path, int):  # a descriptor: its open was seen already
                return
            flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else 0
            raw = os.fsdecode(path)
            # abspath now: a relative path means the working folder of this moment (or a dir_fd).
            events.append((event, raw, flags, os.path.abspath(raw)))
        except Exception:  # a hook that raises would break the open it watches
            return

    @contextmanager
    def armed(self) -> Iterator[None]:
        self.events = []
        try:
            yield
        finally:
            self.events = None

    def drain(self) -> list[tuple[str, str, int, str]]:
        events = self.events
        if events is None:
            return []
        taken = events[:]
        del events[: len(taken)]
        return taken


RECORDER = OpenRecorder()
sys.addaudithook(RECORDER.hook)


def reached(event: str, raw: str, flags: int, path: str) -> str | None:
    """The file an event really touched, or None when it cannot have left a checked folder.

    O_NOFOLLOW opens the link itself, not its target (a link to a decoy opened that way fails
    with ELOOP and reads nothing). The audit event does not carry os.open's dir_fd, so a bare
    name opened with O_NOFOLLOW is one entry of a folder opened (and checked) earlier: the
    server opens files beneath an allowed root one component at a time like that.
    """
    nofollow = event == "open" and flags & getattr(os, "O_NOFOLLOW", 0)
    if nofollow and not os.path.isabs(raw) and os.sep not in raw and raw not in ("", ".", ".."):
        return None
    if nofollow:
        return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    return os.path.realpath(path)


# --- the sandbox ------------------------------------------------------------------------------


@dataclass
class Sandbox:
    photos: Path  # the allowed folder
    root: str  # its real path, as the server reports paths
    decoys: tuple[Path, ...]  # folders outside the allowed one, with images: never to be opened
    targets: frozenset[str]  # files outside that hostile paths name: never to be opened
    images: list[str]  # image paths the server must accept
    folders: list[str]  # folders the server must accept
    hostile: list[str]  # path strings aimed outside, or at things that are not images
    job_ids: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # strategies print their arguments in failure reports: keep it short
        return f"Sandbox({self.root!r})"

    def inside(self, path: str) -> bool:
        # Paths may come back cut short (with an ellipsis), so compare the text, not the file.
        return path == self.root or path.startswith(self.root + os.sep)

    def forbidden(self, event: tuple[str, str, int, str]) -> bool:
        real = reached(*event)
        return real is not None and (real in self.targets or any(Path(real).is_relative_to(d) for d in self.decoys))


# --- driving the server ----------------------------------------------------------------------------


class CrashLog(logging.Handler):
    """Errors the SDK logs when a tool raises something it did not expect, with tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@contextmanager
def served(settings: Settings) -> Iterator[tuple[BlockingPortal, Client, CrashLog]]:
    # Hypothesis drives a plain function, so the test is synchronous: a blocking portal runs an
    # event loop (and the server) in its own thread, wrap_async_context_manager enters and leaves
    # the client's task groups in one task there, and each example is one portal.call. One
    # server per test: loading the model is what costs, not a call.
    crashes = CrashLog()
    logger = logging.getLogger("mcp")
    logger.addHandler(crashes)
    try:
        with start_blocking_portal() as portal, portal.wrap_async_context_manager(connect(settings)) as client:
            yield portal, client, crashes
    finally:
        logger.removeHandler(crashes)


async def _call(client: Client, name: str, args: dict[str, Any]) -> CallToolResult:
    with anyio.fail_after(CALL_TIMEOUT):
        return await client.call_tool(name, args)


VALID_CALLS: dict[str, Callable[[Sandbox], dict[str, Any]]] = {
    "index_folder": lambda sb: {"path": str(sb.photos)},
    "index_status": lambda sb: {},
    "search_images": lambda sb: {"query": "a red square", "top_k": 3},
    "zero_shot_classify": lambda sb: {"images": sb.images[:2], "labels": ["red", "blue"]},
    "explain_similarity_matrix": lambda sb: {"images": sb.images[:2], "captions": ["red", "green"]},
    "compare_prompts": lambda sb: {"images": sb.images[:2], "labels": ["red", "blue"], "truth": ["red", "blue"]},
    "find_duplicates": lambda sb: {"folder": str(sb.photos), "threshold": 0.9},
    "probe_failure_modes": lambda sb: {"source": str(sb.photos), "max_images": 3},
    "train_contrastive_demo": lambda sb: {"images": sb.images[:2], "captions": ["red", "green"], "steps": 3},
}
# Calls that train or render many scenes cost seconds each: fewer examples, and the schema's
# own examples have their cost arguments capped (hostile edits may still push them up).
EXAMPLE_SHARE = {"train_contrastive_demo": 0.34, "probe_failure_modes": 0.5}
COST_CAPS = {
    "train_contrastive_demo": {"steps": 4, "max_seconds": 2.0},
    "probe_failure_modes": {"samples": 8, "max_images": 3},
}

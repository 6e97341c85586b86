"""Many SDK clients calling tools at once over streamable HTTP against a real `cliplens serve --http`:
every call gets its own answer (a result or a tool error, never a transport failure), answers to the
same question agree, and the server keeps serving afterwards."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult

from .conftest import error_text, make_image, structured
from .test_http import HttpServer, start_server, stop, wait_until_listening
from .test_stdio_e2e import TIMEOUT, TOOLS

CLIENTS = 8
QUERIES = ("a red square", "a blue square", "something green", "a yellow picture")
LABELS = ["a red thing", "a green thing", "a blue thing", "a yellow thing"]


@dataclass(frozen=True)
class Call:
    tool: str
    arguments: dict[str, Any]
    error: str | None = None  # a phrase the tool error must contain; None: the call must succeed

    @property
    def key(self) -> str:
        return f"{self.tool} {sorted(self.arguments.items())!r}"


@pytest.fixture(scope="module")
def load_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("load-photos")
    for colour in ("red", "green", "blue", "yellow"):
        make_image(root / f"{colour}.png", colour)
    return root


@pytest.fixture(scope="module")
def load_server(tiny_clip: Path, load_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    server = start_server(tmp_path_factory.mktemp("http-load"), tiny_clip, load_photos, "load")
    try:
        wait_until_listening(server)
        yield server
    finally:
        stop(server)


def plan(client: int, photos: Path, outside: Path) -> list[Call]:
    """Eight calls for one client; every query and every successful call also comes from other clients."""
    images = [str(photos / f"{c}.png") for c in ("red", "green", "blue", "yellow")]
    invalid = [
        Call("search_images", {"query": "a red square", "top_k": 0}, error="top_k"),
        Call("zero_shot_classify", {"images": [str(outside)], "labels": LABELS[:2]}, error="outside the allowed"),
        Call("explain_similarity_matrix", {"images": images[:2], "captions": LABELS[:3]}, error="one caption per"),
        Call("no_such_tool", {}, error="no_such_tool"),
    ]
    return [
        Call("search_images", {"query": QUERIES[client % 4], "top_k": 3, "thumbnails": False, "cutoff": "none"}),
        Call("search_images", {"query": QUERIES[(client + 1) % 4], "top_k": 3, "thumbnails": False, "cutoff": "none"}),
        # Thumbnails make the answer a few kB of base64 images, streamed alongside the others.
        Call("search_images", {"query": QUERIES[(client + 2) % 4], "top_k": 2, "thumbnails": True, "cutoff": "none"}),
        Call("zero_shot_classify", {"images": images[client % 2 :: 2], "labels": LABELS}),
        Call("explain_similarity_matrix", {"images": images[:3], "captions": LABELS[:3]}),
        Call("index_status", {}),
        invalid[client % 4],
        invalid[(client + 1) % 4],
    ]


async def run_client(url: str, calls: list[Call], answers: dict[tuple[int, int], Any], client: int) -> None:
    async with Client(url) as session:

        async def one(i: int, call: Call) -> None:
            # Keep whatever comes back, exception included: the test reports every call, not the first failure.
            try:
                answers[client, i] = await session.call_tool(call.tool, call.arguments)
            except Exception as exc:
                answers[client, i] = exc

        async with anyio.create_task_group() as tg:
            for i, call in enumerate(calls):
                tg.start_soon(one, i, call)


def check_success(call: Call, out: dict[str, Any]) -> None:
    """The answer belongs to this call, not to another one in flight at the same time."""
    if call.tool == "search_images":
        assert out["query"] == call.arguments["query"], out
        assert [h["rank"] for h in out["hits"]] == list(range(1, call.arguments["top_k"] + 1)), out
    elif call.tool == "zero_shot_classify":
        assert [r["image"] for r in out["results"]] == call.arguments["images"], out
        assert all(set(r["probabilities"]) == set(LABELS) for r in out["results"]), out
    elif call.tool == "explain_similarity_matrix":
        assert out["captions"] == call.arguments["captions"] and out["n"] == 3, out
    else:
        assert isinstance(out["jobs"], list), out


@pytest.mark.slow  # a server subprocess and 65 calls: about 15 s on two busy cores
async def test_many_concurrent_calls_over_http_all_get_their_answer(
    load_server: HttpServer, load_photos: Path, tmp_path: Path
) -> None:
    outside = make_image(tmp_path / "outside.png", "red")
    plans = [plan(c, load_photos, outside) for c in range(CLIENTS)]
    answers: dict[tuple[int, int], Any] = {}
    with anyio.fail_after(TIMEOUT):
        async with Client(load_server.url) as setup:
            indexed = structured(await setup.call_tool("index_folder", {"path": str(load_photos)}))
            assert indexed["store_total"] == 4
        async with anyio.create_task_group() as tg:
            for c in range(CLIENTS):
                tg.start_soon(run_client, load_server.url, plans[c], answers, c)

    total = sum(len(p) for p in plans)
    assert total >= 60
    missing = [(c, i) for c in range(CLIENTS) for i in range(len(plans[c])) if (c, i) not in answers]
    failed = {k: v for k, v in answers.items() if not isinstance(v, CallToolResult)}
    assert not missing and not failed, (missing, failed)

    outputs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (c, i), result in answers.items():
        call = plans[c][i]
        if call.error is None:
            out = structured(result)
            check_success(call, out)
            outputs[call.key].append(out)
        else:
            assert call.error in error_text(result), (call, result.content)
    assert sum(len(v) for v in outputs.values()) == 6 * CLIENTS

    # Every repeated question got the same answer; index_status alone may change (it carries no
    # jobs here, but its answer is not a pure function of the call).
    for key, outs in outputs.items():
        assert len(outs) >= 2, key
        if not key.startswith("index_status"):
            assert all(o == outs[0] for o in outs), key

    for query in QUERIES:
        top3 = outputs[Call("search_images", {"query": query, "top_k": 3, "thumbnails": False, "cutoff": "none"}).key][
            0
        ]["hits"]
        top2 = outputs[Call("search_images", {"query": query, "top_k": 2, "thumbnails": True, "cutoff": "none"}).key][
            0
        ]["hits"]
        assert top2 == top3[:2], query

    # Still alive, and still answering the way it did under load.
    assert load_server.proc.poll() is None, load_server.log.read_text()
    with anyio.fail_after(TIMEOUT):
        async with Client(load_server.url) as after:
            assert {t.name for t in (await after.list_tools()).tools} == TOOLS
            again = plans[0][0]
            assert structured(await after.call_tool(again.tool, again.arguments)) == outputs[again.key][0]
    assert "Traceback" not in load_server.log.read_text()

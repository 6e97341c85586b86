"""Concurrency: searches while indexing, a second server on the same store, and the per-call
time limit of a foreground index."""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from cliplens.server.config import Settings

from .conftest import connect, error_text, make_image, structured
from .test_stdio_e2e import TIMEOUT, cliplens_command, isolated_env, serve_args


def many_images(folder: Path, n: int) -> Path:
    for i in range(n):
        make_image(folder / f"b{i // 100}" / f"img{i:04d}.png", (i * 7 % 256, i * 13 % 256, i * 29 % 256))
    return folder


def assert_consistent(found: dict[str, Any], top_k: int, folder: Path) -> None:
    hits = found["hits"]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    paths = [h["path"] for h in hits]
    assert len(paths) == len(set(paths)) and len(hits) <= top_k
    assert all(Path(p).is_relative_to(folder.resolve()) and Path(p).is_file() for p in paths)


async def test_searches_during_a_background_index_are_consistent(settings: Settings, tmp_path: Path) -> None:
    folder = many_images(settings.allow[0] / "many", 300)
    query = {"query": "a red square", "top_k": 10, "thumbnails": False, "cutoff": "none"}
    seen: list[dict[str, Any]] = []
    async with connect(settings) as client:
        started = structured(await client.call_tool("index_folder", {"path": str(folder), "background": True}))
        job = started["job"]["job_id"]
        while True:
            seen.append(structured(await client.call_tool("search_images", query)))
            status = structured(await client.call_tool("index_status", {"job_id": job}))["jobs"][0]
            if status["state"] not in ("queued", "running"):
                break
        assert status["state"] == "completed"
        final = structured(await client.call_tool("search_images", {**query, "top_k": 100}))
    assert len(seen) >= 2  # at least one search ran while the job did
    final_scores = {h["path"]: h["score"] for h in final["hits"]}
    totals = [s["indexed_total"] for s in seen]
    assert totals == sorted(totals)  # the store only grows while indexing
    for found in seen:
        assert_consistent(found, 10, folder.parent)
        for hit in found["hits"]:
            # A hit seen mid-index has the score it has at the end: no half-written vectors.
            if hit["path"] in final_scores:
                assert hit["score"] == pytest.approx(final_scores[hit["path"]], abs=1e-5)


async def test_a_foreground_index_stops_at_its_time_limit_and_keeps_going_next_call(
    settings: Settings, tmp_path: Path
) -> None:
    folder = many_images(settings.allow[0] / "many", 600)
    hurried = settings.model_copy(update={"call_timeout": 0.2})
    async with connect(hurried) as client:
        stopped = await client.call_tool("index_folder", {"path": str(folder)})
        message = error_text(stopped)
        assert "0.2 s limit" in message and "background=true" in message
        # The server is fine and answers the next call.
        assert structured(
            await client.call_tool("search_images", {"query": "red", "thumbnails": False, "cutoff": "none"})
        )
    async with connect(settings) as client:
        done = structured(await client.call_tool("index_folder", {"path": str(folder)}))
    assert done["added"] + done["unchanged"] == done["scanned"] == 600
    assert done["store_total"] == 600


@pytest.mark.slow
async def test_a_read_only_second_server_searches_while_the_first_indexes(
    tiny_clip: Path, photos: Path, tmp_path: Path
) -> None:
    """Two stdio clients (say a desktop app and an IDE) start cliplens on one store: the second
    is read-only. While the first writes, each of its searches is either a consistent answer or
    a clear error saying the owner has not saved its index yet; once the owner has closed, it
    answers from everything the owner wrote."""
    folder = many_images(photos / "many", 400)
    db = tmp_path / "db"

    def params(name: str) -> StdioServerParameters:
        env = isolated_env(tmp_path / name)
        command = cliplens_command()
        return StdioServerParameters(
            command=command[0], args=[*command[1:], *serve_args(tiny_clip, db, photos)], env=env
        )

    query = {"query": "a green square", "top_k": 10, "thumbnails": False, "cutoff": "none"}
    answers: list[dict[str, Any]] = []
    waits: list[str] = []
    indexed: dict[str, Any] = {}
    with (tmp_path / "w.txt").open("w") as werr, (tmp_path / "r.txt").open("w") as rerr, anyio.fail_after(TIMEOUT * 3):
        async with AsyncExitStack() as stack:
            writer = await stack.enter_async_context(Client(stdio_client(params("writer"), errlog=werr)))
            structured(await writer.call_tool("search_images", query))  # it answers: it holds the lock
            reader = await stack.enter_async_context(Client(stdio_client(params("reader"), errlog=rerr)))
            assert "locked by another cliplens process" in error_text(
                await reader.call_tool("index_folder", {"path": str(folder)})
            )

            async def index() -> None:
                indexed.update(structured(await writer.call_tool("index_folder", {"path": str(folder)})))

            async with anyio.create_task_group() as tg:
                tg.start_soon(index)
                while not indexed:
                    result = await reader.call_tool("search_images", query)
                    if result.is_error:
                        waits.append(error_text(result))
                    else:
                        answers.append(structured(result))
                    await anyio.sleep(0.05)
            final = structured(await writer.call_tool("search_images", {**query, "top_k": 100}))
            await stack.aclose()  # the writer closes first, saving its index
        async with Client(stdio_client(params("reader-after"), errlog=rerr)) as late_reader:
            after = structured(await late_reader.call_tool("search_images", query))
    print(f"reader during the index: {len(answers)} answers, {len(waits)} clear waits", file=sys.stderr)
    assert indexed["added"] == 400 and len(answers) + len(waits) >= 3
    for message in waits:
        assert "has not saved its vector index to disk yet" in message, message
    final_scores = {h["path"]: h["score"] for h in final["hits"]}
    assert [h["path"] for h in after["hits"]] == [h["path"] for h in final["hits"][:10]]
    for found in [*answers, after]:
        assert_consistent(found, 10, photos)
        for hit in found["hits"]:
            if hit["path"] in final_scores:
                assert hit["score"] == pytest.approx(final_scores[hit["path"]], abs=1e-5)

"""--chroma-url: the same tools against a real Chroma server (`chroma run`) on loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cliplens.server.config import Settings

from .conftest import connect, structured


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chroma_url(tmp_path: Path) -> Iterator[str]:
    exe = shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "run", "--path", str(tmp_path / "chroma"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("chroma run did not start")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_index_and_search_through_a_chroma_server(settings: Settings, photos: Path, chroma_url: str) -> None:
    remote = settings.model_copy(update={"chroma_url": chroma_url, "db_dir": None})
    async with connect(remote) as client:
        out = structured(await client.call_tool("index_folder", {"path": str(photos)}))
        assert out["added"] == 4 and out["store_total"] == 4
    # A second server process (a new session) sees the same records and reuses them.
    async with connect(remote) as client:
        again = structured(await client.call_tool("index_folder", {"path": str(photos)}))
        assert again["unchanged"] == 4
        hits = structured(await client.call_tool("search_images", {"query": "red", "top_k": 4}))["hits"]
        assert len(hits) == 4


def test_a_bad_chroma_url_is_named() -> None:
    from cliplens.server.store import StoreError, open_client

    with pytest.raises(StoreError, match="'ftp://x' is not an http"):
        open_client(None, "ftp://x")

"""--chroma-url: the same tools against a real Chroma server (`chroma run`) on loopback."""

from __future__ import annotations

import json
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
        hits = structured(await client.call_tool("search_images", {"query": "red", "top_k": 4, "cutoff": "none"}))[
            "hits"
        ]
        assert len(hits) == 4


def test_a_bad_chroma_url_is_named() -> None:
    from cliplens.server.store import StoreError, open_client

    with pytest.raises(StoreError, match="'ftp://x' is not an http"):
        open_client(None, "ftp://x")


def test_several_indexers_write_into_one_server_at_once(tiny_clip: Path, tmp_path: Path, chroma_url: str) -> None:
    """Three processes, each its own 'machine' (own home and data folder), index at the same
    time: two on different folders, a third on the first folder again. Every image lands once."""
    from .conftest import make_image
    from .test_stdio_e2e import cliplens_command, isolated_env

    folders = {"alpha": 30, "beta": 25}
    shared = tmp_path / "shared"
    for name, count in folders.items():
        for i in range(count):
            make_image(shared / name / f"{name}{i:02d}.png", (i * 8, 60 if name == "alpha" else 200, 90))
    writers = [("m1", "alpha"), ("m2", "beta"), ("m3", "alpha")]
    procs = []
    for machine, folder in writers:
        cmd = [*cliplens_command(), "index", str(shared / folder), "--chroma-url", chroma_url, "--json"]
        cmd += ["--model", str(tiny_clip), "--device", "cpu", "--precision", "fp32", "--allow", str(shared)]
        env = isolated_env(tmp_path / machine)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(json.loads(out))
    assert [o["scanned"] for o in outputs] == [30, 25, 30]
    # The two writers of alpha raced: between them each image was embedded at least once.
    assert outputs[0]["added"] + outputs[0]["updated"] + outputs[2]["added"] + outputs[2]["updated"] >= 30

    from cliplens.server.encoder import load_encoder
    from cliplens.server.store import ImageStore, open_client

    encoder = load_encoder(str(tiny_clip), "cpu", "fp32")
    store = ImageStore(open_client(None, chroma_url), encoder.info, location=chroma_url)
    assert store.count() == 55
    for name, count in folders.items():
        entries = store.entries_under(shared / name)
        assert len(entries) == count and all(Path(p).parent.name == name for p in entries)
    vector = encoder.embed_texts(["a photo"])[0]
    hits = store.query(vector, 10, [shared / "beta"])
    assert len(hits) == 10 and all(Path(s.path).parent.name == "beta" for s, _ in hits)

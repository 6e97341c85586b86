"""The Chroma store: one collection per model, batching, values, folder prefixes, the lock."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest

from cliplens.server.app import open_engine
from cliplens.server.config import Settings
from cliplens.server.encoder import load_encoder
from cliplens.server.lock import StoreLock
from cliplens.server.store import ImageRecord, ImageStore, StoredImage, StoreError, open_client
from cliplens.server.tinymodel import build_tiny_model
from cliplens.tools.index_folder import IndexFolderInput, index_folder

from .conftest import connect, make_image, structured


def _record(path: str, dim: int, seed: int = 0) -> ImageRecord:
    vec = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return ImageRecord(StoredImage(path, 1, 2, "h", 3, 4), vec / np.linalg.norm(vec))


def _store(settings: Settings, lock: StoreLock | None = None) -> ImageStore:
    encoder = load_encoder(settings.model, "cpu")
    return ImageStore(open_client(settings.db_dir, None), encoder.info, location="test", lock=lock)


def test_switching_models_never_mixes_spaces(settings: Settings, photos: Path, tmp_path: Path) -> None:
    with open_engine(settings) as app:
        index_folder(app.encoder, app.store, app.policy, IndexFolderInput(path=str(photos)))
        first_total = app.store.count()
    other = build_tiny_model(tmp_path / "other-model", seed=1)  # same size, other weights
    with open_engine(settings.model_copy(update={"model": str(other)})) as app:
        assert app.store.count() == 0  # its own collection
        names = {c.name for c in app.store.client.list_collections()}
        assert len(names) == 2
        meta = app.store.client.get_collection(f"cliplens-{app.encoder.info.fingerprint}").metadata
        assert meta["model"] == str(other) and meta["dim"] == 16
    with open_engine(settings) as app:
        assert app.store.count() == first_total == 4


def test_upserts_are_batched_below_chromas_limit(settings: Settings) -> None:
    store = _store(settings)
    store.max_batch = 7
    store.upsert([_record(f"/p/{i}.png", store.info.dim, i) for i in range(20)])
    assert store.count() == 20
    store.upsert([_record(f"/p/{i}.png", store.info.dim, i + 100) for i in range(20)])  # upsert, not add
    assert store.count() == 20
    store.delete([f"/p/{i}.png" for i in range(15)])
    assert store.count() == 5


def test_non_finite_and_wrong_size_vectors_are_refused(settings: Settings) -> None:
    store = _store(settings)
    bad = _record("/p/nan.png", store.info.dim)
    bad.embedding[0] = np.nan
    with pytest.raises(StoreError, match="non-finite"):
        store.upsert([bad])
    with pytest.raises(StoreError, match="does not match"):
        store.upsert([_record("/p/x.png", store.info.dim + 1)])
    assert store.count() == 0


@pytest.mark.parametrize("name", ["photos", "a+b (1)[x]", "dots.and$caret^", "naïve"])
def test_folder_prefixes_are_component_wise_and_escaped(settings: Settings, name: str) -> None:
    store = _store(settings)
    dim = store.info.dim
    folder = Path("/data") / name
    store.upsert(
        [
            _record(str(folder / "in.png"), dim, 1),
            _record(str(folder / "deep" / "in2.png"), dim, 2),
            _record(str(Path("/data") / (name + "2") / "out.png"), dim, 3),
            _record(str(Path("/x") / name / "out2.png"), dim, 4),
        ]
    )
    assert set(store.entries_under(folder)) == {str(folder / "in.png"), str(folder / "deep" / "in2.png")}
    assert set(store.entries_under(folder, recursive=False)) == {str(folder / "in.png")}
    hits = store.query(_record("q", dim, 1).embedding, 10, [folder])
    assert {h.path for h, _ in hits} == {str(folder / "in.png"), str(folder / "deep" / "in2.png")}
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)


def test_a_second_owner_gets_a_read_only_store(settings: Settings) -> None:
    assert settings.db_dir is not None
    first, second = StoreLock(settings.db_dir), StoreLock(settings.db_dir)
    assert first.acquire()
    try:
        assert not second.acquire()
        store = _store(settings, lock=second)
        assert store.read_only and store.count() == 0
        assert store.client.list_collections() == []  # it created nothing
        with pytest.raises(StoreError, match=r"locked by another cliplens process \(pid \d+\)"):
            store.upsert([_record("/p/x.png", store.info.dim)])
    finally:
        first.release()
    assert second.acquire()
    second.release()


async def test_cancelling_index_keeps_finished_batches_and_the_server_alive(settings: Settings, photos: Path) -> None:
    for i in range(200):
        make_image(photos / "many" / f"{i:03d}.png", (i, 255 - i, (7 * i) % 255))
    async with connect(settings) as client:
        async with anyio.create_task_group() as tg:

            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                if done > 0:
                    tg.cancel_scope.cancel()

            async def call() -> None:
                await client.call_tool("index_folder", {"path": str(photos)}, progress_callback=on_progress)

            tg.start_soon(call)
        # The server answers the next call, and the store holds whole batches only.
        out = structured(await client.call_tool("search_images", {"query": "x", "top_k": 1}))
        partial = out["indexed_total"]
        assert 0 < partial < 204 and partial % 16 == 0
        again = structured(await client.call_tool("index_folder", {"path": str(photos)}))
        assert again["unchanged"] == partial and again["added"] == 204 - partial

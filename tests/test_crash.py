"""Crashes: the indexer killed with SIGKILL at random points, and damaged vector index files.

Chroma saves its HNSW files only every `sync_threshold` records (1000 by default); below
that, the whole index is replayed from SQLite's log and the files do not matter. So these
tests create the collection first with a small threshold: the files then carry the index,
as they do in any real store past a thousand images, and damage or a kill can reach them.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from chromadb.api.shared_system_client import SharedSystemClient
from PIL import Image

import cliplens.tools.index_folder as ix
from cliplens.server import health
from cliplens.server.app import AppContext, open_engine
from cliplens.server.config import Settings
from cliplens.server.encoder import PREPROCESSING_VERSION, load_encoder
from cliplens.server.lock import StoreLock
from cliplens.server.store import SCHEMA_VERSION, StoreError, collection_name, open_client
from cliplens.tools.index_folder import IndexFolderInput, index_folder
from cliplens.tools.search_images import SearchImagesInput, search_images

from .conftest import make_image
from .test_stdio_e2e import cliplens_command, isolated_env

SYNC = 8  # records between saves of the HNSW files
TIMEOUT = 60
QUERIES = ["a red square", "a photo of a blue car", "green", "a small yellow star"]
# (what, file): file None is the whole segment folder.
DAMAGE = [
    ("truncate", "index_metadata.pickle"),  # torn: SIGKILL mid-save left it empty in our kill runs
    ("delete", "index_metadata.pickle"),  # Chroma then serves the log's tail only, silently
    ("zero", "data_level0.bin"),  # Chroma answers with wrong neighbours, silently
    ("truncate", "data_level0.bin"),
    ("zero", "length.bin"),  # Chroma returns wrong embeddings, silently
    ("delete", "header.bin"),  # Chroma fails every call, count included
    ("truncate", "header.bin"),  # Chroma crashes the process (SIGSEGV)
    ("zero", "link_lists.bin"),  # Chroma crashes the process (SIGSEGV)
    ("delete", None),
]


def precreate(settings: Settings, sync: int = SYNC) -> None:
    """Create the model's collection as ImageStore would, but saving the index every `sync` records."""
    info = load_encoder(settings.model, "cpu").info
    client = open_client(settings.store_dir(), None)
    metadata = {
        "model": info.model_id,
        "model_type": info.model_type,
        "dim": info.dim,
        "fingerprint": info.fingerprint,
        "preprocessing_version": PREPROCESSING_VERSION,
        "schema_version": SCHEMA_VERSION,
    }
    hnsw = {"space": "cosine", "sync_threshold": sync, "batch_size": max(1, sync // 2)}
    client.get_or_create_collection(
        collection_name(info), metadata=metadata, configuration={"hnsw": hnsw}, embedding_function=None
    )
    fresh_process()


def fresh_process() -> None:
    """Forget Chroma's in-process state, as a new process would: the next client reads the disk."""
    SharedSystemClient.clear_system_cache()
    gc.collect()


def many(folder: Path, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        make_image(folder / f"img{i:03d}.png", (i * 37 % 256, i * 91 % 256, i * 53 % 256), (24, 20))


def segment(app: AppContext) -> Path:
    assert app.store.db_dir is not None and app.store.collection_id is not None
    found = health.segment_dir(app.store.db_dir, app.store.collection_id)
    assert found is not None
    return found


def snapshot(app: AppContext) -> tuple[dict[str, np.ndarray], list[list[tuple[str, float]]]]:
    """Every record's embedding by path, and the hits of QUERIES."""
    got = app.store.require_writable().get(include=["documents", "embeddings"])
    vectors = {doc: np.asarray(v, np.float32) for doc, v in zip(got["documents"], got["embeddings"], strict=True)}
    hits = []
    for query in QUERIES:
        result = search_images(
            app.encoder, app.store, app.policy, SearchImagesInput(query=query, top_k=10, cutoff="none")
        )
        assert result.hint is None, result.hint
        hits.append([(h.path, h.score) for h in result.hits])
    return vectors, hits


def same_snapshot(a: tuple[dict[str, np.ndarray], list[Any]], b: tuple[dict[str, np.ndarray], list[Any]]) -> None:
    assert sorted(a[0]) == sorted(b[0])
    for path, vec in a[0].items():
        np.testing.assert_allclose(b[0][path], vec, atol=1e-5, err_msg=path)
    for hits_a, hits_b in zip(a[1], b[1], strict=True):
        assert [p for p, _ in hits_a] == [p for p, _ in hits_b]
        np.testing.assert_allclose([s for _, s in hits_a], [s for _, s in hits_b], atol=1e-5)


def damage(folder: Path, what: str, name: str | None) -> None:
    path = folder / name if name else folder
    assert path.exists(), f"{path} was never written: the test would test nothing"
    if name is None:
        shutil.rmtree(path)
    elif what == "delete":
        path.unlink()
    elif what == "truncate" and name == "data_level0.bin":
        # The file may hold room for more elements than it has: cut into the ones it has.
        count, size = health.HEADER.unpack_from((folder / "header.bin").read_bytes())[3:5]
        os.truncate(path, count * size // 2)
    elif what == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.write_bytes(bytes(path.stat().st_size))


def damage_index(settings: Settings, what: str, name: str | None) -> Path:
    """Damage the stored index's files as a crash might, between two processes; returns their folder."""
    with open_engine(settings, resume_jobs=False) as app:
        folder = segment(app)
    fresh_process()
    damage(folder, what, name)
    return folder


@pytest.fixture
def indexed(settings: Settings, photos: Path) -> Iterator[tuple[Settings, Any]]:
    """A store of 44 images whose HNSW files hold most of them; its records and hits, from
    before any damage."""
    many(photos / "many", 40)
    precreate(settings)
    with open_engine(settings, resume_jobs=False) as app:
        index_folder(app.encoder, app.store, app.policy, IndexFolderInput(path=str(photos)))
        before = snapshot(app)
        assert (segment(app) / "index_metadata.pickle").is_file(), "the index files hold nothing: test nothing"
    fresh_process()
    yield settings, before
    fresh_process()


@pytest.mark.parametrize(("what", "name"), DAMAGE, ids=[f"{w}-{n or 'folder'}" for w, n in DAMAGE])
def test_damaged_index_is_detected_and_rebuilt_from_the_files(
    indexed: tuple[Settings, Any], what: str, name: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    settings, before = indexed
    old = damage_index(settings, what, name)
    with caplog.at_level(logging.WARNING), open_engine(settings, resume_jobs=False) as app:
        assert "is damaged" in caplog.text and "rebuilding the vector index" in caplog.text
        assert app.store.damage is None and app.store.rebuild_note() is None
        assert not old.exists(), "the damaged index folder was left behind"
        same_snapshot(before, snapshot(app))
    assert not (settings.store_dir() / "rebuild").exists() or not any((settings.store_dir() / "rebuild").iterdir())
    fresh_process()
    caplog.clear()
    with caplog.at_level(logging.WARNING), open_engine(settings, resume_jobs=False) as app:
        assert "damaged" not in caplog.text  # the rebuilt index passes the check
        same_snapshot(before, snapshot(app))


def test_a_stale_index_with_fewer_vectors_than_records_is_caught(
    settings: Settings, photos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Index files older than SQLite says (a save that never reached the disk) are whole and
    load fine; Chroma then serves only the log's tail, silently."""
    many(photos / "many", 20)
    precreate(settings)
    with open_engine(settings, resume_jobs=False) as app:
        index_folder(app.encoder, app.store, app.policy, IndexFolderInput(path=str(photos)))
        old = segment(app)
    fresh_process()
    saved = photos.parent / "saved-index"
    shutil.copytree(old, saved)
    many(photos / "many", 20, start=20)
    with open_engine(settings, resume_jobs=False) as app:
        index_folder(app.encoder, app.store, app.policy, IndexFolderInput(path=str(photos)))
        before = snapshot(app)
        assert len(before[0]) == 44
    fresh_process()
    shutil.rmtree(old)
    shutil.copytree(saved, old)
    with caplog.at_level(logging.WARNING), open_engine(settings, resume_jobs=False) as app:
        assert "vectors for 44 records" in caplog.text
        same_snapshot(before, snapshot(app))


def test_a_read_only_process_reports_the_damage_and_leaves_the_store_alone(
    indexed: tuple[Settings, Any], caplog: pytest.LogCaptureFixture
) -> None:
    settings, _ = indexed
    folder = damage_index(settings, "zero", "data_level0.bin")
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    holder = StoreLock(settings.store_dir())
    assert holder.acquire()  # another process owns the store
    try:
        with caplog.at_level(logging.WARNING), open_engine(settings) as app:
            assert app.store.read_only and "is damaged" in caplog.text
            with pytest.raises(StoreError, match=r"damaged.*rebuilds it"):
                search_images(app.encoder, app.store, app.policy, SearchImagesInput(query="red", cutoff="none"))
    finally:
        holder.release()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    assert not (settings.store_dir() / "rebuild").exists()


def test_a_server_rebuilds_in_the_background_and_searches_say_so(
    indexed: tuple[Settings, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, before = indexed
    damage_index(settings, "truncate", "index_metadata.pickle")
    release = threading.Event()
    real = ix.index_folder

    def held(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(TIMEOUT)
        return real(*args, **kwargs)

    monkeypatch.setattr(ix, "index_folder", held)
    with open_engine(settings) as app:  # a server: the rebuild runs as background jobs
        jobs = app.jobs.list()
        assert {(j.folder, j.recursive, j.prune) for j in jobs} == {
            (str(p), False, False) for p in {Path(path).parent for path in before[0]}
        }
        result = search_images(app.encoder, app.store, app.policy, SearchImagesInput(query="red", cutoff="none"))
        assert result.hint is not None and "being rebuilt" in result.hint and "0 of 3 folders" in result.hint
        release.set()
        for job in jobs:
            assert app.jobs.wait(job.job_id, TIMEOUT).state == "completed"
        same_snapshot(before, snapshot(app))  # no hint any more: the rebuild is over
    assert not any((settings.store_dir() / "rebuild").iterdir())


def test_folders_gone_or_no_longer_allowed_are_given_up_and_the_rebuild_ends(
    indexed: tuple[Settings, Any], caplog: pytest.LogCaptureFixture
) -> None:
    settings, before = indexed
    damage_index(settings, "zero", "data_level0.bin")
    photos = settings.allow[0]
    shutil.rmtree(photos / "sub")
    narrow = settings.model_copy(update={"allow": [photos / "many"]})  # photos/ itself is no longer allowed
    with caplog.at_level(logging.WARNING), open_engine(narrow) as app:
        for job in app.jobs.list():
            assert app.jobs.wait(job.job_id, TIMEOUT).state in ("completed", "failed")
        assert app.store.rebuild_note() is None and "is rebuilt" in caplog.text
        assert caplog.text.count("could not re-index") == 2
        got = app.store.require_writable().get(include=["documents"])
        assert sorted(got["documents"]) == sorted(p for p in before[0] if Path(p).parent == photos / "many")
    assert not any((settings.store_dir() / "rebuild").iterdir())


# --- SIGKILL at random points ---------------------------------------------------------------

KILLS = 20
PROGRESS = re.compile(r"\[[#.]{30}\] \d+/\d+")  # cli._progress_bar, once the scan is over
MAX_CYCLES = 40
VALID = 40
SERVE_SCRIPT = """
import sys
from cliplens.server.app import open_engine
from cliplens.server.config import Settings
from cliplens.server.jobs import JobRequest
with open_engine(Settings.model_validate_json(sys.argv[1])) as app:
    job = app.jobs.submit(JobRequest(path=sys.argv[2]))
    print("submitted", flush=True)
    app.jobs.wait(job.job_id, 120)
    print("done", flush=True)
"""


class Corpus:
    """Valid images that change between runs, and files that are not images."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.next = 0
        for _ in range(VALID):
            self.add()
        (root / "notes.jpg").write_text("not an image")
        (root / "empty.png").write_bytes(b"")
        make_image(root / "cut.png", "red", (64, 64))
        data = (root / "cut.png").read_bytes()
        (root / "cut.png").write_bytes(data[: len(data) // 3])  # a PNG cut short
        self.invalid = {str(root / n) for n in ("notes.jpg", "empty.png", "cut.png")}

    def add(self) -> None:
        where = self.root / ("sub" if self.next % 3 == 0 else "") / f"p{self.next:03d}.png"
        self.paint(where)
        self.next += 1

    def paint(self, path: Path) -> None:
        rgb = tuple(self.rng.randrange(256) for _ in range(3))
        make_image(path, rgb, (self.rng.randrange(16, 40), self.rng.randrange(16, 40)))  # type: ignore[arg-type]

    def valid(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*.png") if str(p) not in self.invalid)

    def mutate(self) -> None:
        """New content for some files, a few new ones, one gone: every run has work to do."""
        files = self.valid()
        for path in self.rng.sample(files, 12):
            self.paint(path)
        for _ in range(2):
            self.add()
        self.rng.choice(files).unlink()


class Killer:
    """One indexing process, watched for the moment its work starts, killed when told."""

    def __init__(self, args: list[str], env: dict[str, str], started: Callable[[str], object]) -> None:
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.begun = time.monotonic()
        self.working = threading.Event()
        self.output: list[str] = []
        self._started = started
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True) for s in self.streams()]
        for reader in self._readers:
            reader.start()

    def streams(self) -> list[Any]:
        return [self.proc.stdout, self.proc.stderr]

    def _read(self, stream: Any) -> None:
        for chunk in iter(lambda: stream.read(1 if not self.working.is_set() else 4096), ""):
            self.output.append(chunk)
            if not self.working.is_set() and self._started("".join(self.output[-200:])):
                self.working.set()

    def kill_after(self, delay: float) -> bool:
        """SIGKILL after `delay` s; False when the process had already finished."""
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.005)
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGKILL)
        self.finish()
        return alive

    def kill_when_saving(self, db: Path, rng: random.Random) -> bool:
        """SIGKILL as soon as Chroma starts writing its HNSW files; False if it never did."""

        def stamps() -> dict[str, int]:
            found = {}
            for path in db.glob("*/header.bin"):
                with contextlib.suppress(FileNotFoundError):
                    found[str(path)] = path.stat().st_mtime_ns
            return found

        before = stamps()
        deadline = time.monotonic() + TIMEOUT
        while self.proc.poll() is None and time.monotonic() < deadline:
            now = stamps()
            if any(before.get(path) != stamp for path, stamp in now.items()):
                return self.kill_after(rng.uniform(0.0, 0.002))  # within the save, or just after
            time.sleep(0.0005)
        return self.kill_after(0.0)

    def finish(self) -> str:
        self.proc.wait(TIMEOUT)
        for reader in self._readers:
            reader.join(TIMEOUT)
        return "".join(self.output)


@pytest.mark.slow
def test_sigkill_at_random_points_then_index_again(tiny_clip: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("CLIPLENS_CRASH_SEED") or random.SystemRandom().randrange(2**31))
    try:
        _kill_and_recover(tiny_clip, tmp_path, random.Random(seed))
    except BaseException as exc:
        raise AssertionError(f"failed with seed {seed}: rerun with CLIPLENS_CRASH_SEED={seed}: {exc}") from exc


def _kill_and_recover(model: Path, tmp: Path, rng: random.Random) -> None:
    corpus = Corpus(tmp / "photos", rng)
    db = tmp / "db"
    settings = Settings(model=str(model), device="cpu", precision="fp32", db_dir=db, allow=[corpus.root])
    precreate(settings)
    env = isolated_env(tmp)
    cli = [*cliplens_command(), "index", str(corpus.root), "--model", str(model), "--db", str(db)]
    cli += ["--device", "cpu", "--precision", "fp32"]
    serve = [sys.executable, "-c", SERVE_SCRIPT, settings.model_dump_json(), str(corpus.root)]

    # One whole run to learn how long a run takes, and when its work starts.
    first = Killer(cli, env, PROGRESS.search)
    out = first.finish()
    full = time.monotonic() - first.begun
    assert first.proc.returncode == 0, out
    kills: list[str] = []
    cycles = 0
    while len(kills) < KILLS:
        cycles += 1
        assert cycles <= MAX_CYCLES, f"only {len(kills)} kills landed in {MAX_CYCLES} runs: {kills}"
        corpus.mutate()
        if cycles % 5 == 0:  # a server with a background job (and the jobs a crash left)
            run = Killer(serve, env, lambda out: "submitted" in out)
        else:
            run = Killer(cli, env, PROGRESS.search)  # the progress bar: the scan is over
        dice = rng.random()
        # Half land anywhere (a run is mostly its start-up, so they are cheap); the rest
        # where the store is written.
        if dice < 0.5:
            when = "blind"  # anywhere: startup, store creation, the scan, the writes, the end
            alive = run.kill_after(rng.uniform(0.0, full))
        elif dice < 0.75:
            when = "working"  # the scan is over: reading, embedding, writing batches
            assert run.working.wait(TIMEOUT), run.finish()
            alive = run.kill_after(rng.uniform(0.0, 0.3))
        else:
            when = "saving"  # Chroma is writing its index files
            alive = run.kill_when_saving(db, rng)
        log = "".join(run.output)
        assert "Traceback" not in log and "Segmentation" not in log, log
        if kills and "rebuilding the vector index" in log:  # damage the previous kill left, found at start
            kills[-1] += "(damaged)"
        if alive:
            kills.append(when)
    final = Killer(cli, env, lambda out: False)
    out = final.finish()
    assert final.proc.returncode == 0, out
    print(f"{len(kills)} kills in {cycles} runs: {kills}")
    fresh_process()
    check_store(settings, corpus)


def check_store(settings: Settings, corpus: Corpus) -> None:
    valid = corpus.valid()
    with open_engine(settings, resume_jobs=False) as app:
        assert app.store.damage is None
        got = app.store.require_writable().get(include=["documents", "metadatas", "embeddings"])
        docs = got["documents"]
        assert len(docs) == len(set(docs)) == app.store.count() == len(valid)
        assert set(docs) == {str(p) for p in valid} and not set(docs) & corpus.invalid
        hashes = sorted(m["content_hash"] for m in got["metadatas"])
        assert hashes == sorted(hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest() for p in valid)
        # The embeddings are those of the files as they are now, recomputed here.
        fresh = app.encoder.embed_images([Image.open(p).convert("RGB") for p in valid])
        by_path = dict(zip([str(p) for p in valid], fresh, strict=True))
        stored = np.asarray(got["embeddings"], np.float32)
        np.testing.assert_allclose(stored, np.stack([by_path[d] for d in docs]), atol=1e-4)
        for query in QUERIES:
            text = app.encoder.embed_texts([query])[0]
            result = search_images(
                app.encoder, app.store, app.policy, SearchImagesInput(query=query, top_k=10, cutoff="none")
            )
            assert result.hint is None and len(result.hits) == 10
            for hit in result.hits:
                assert hit.score == pytest.approx(float(by_path[hit.path] @ text), abs=1e-4)
            best = sorted((float(v @ text) for v in fresh), reverse=True)[:10]
            np.testing.assert_allclose([h.score for h in result.hits], best, atol=1e-4)


@pytest.mark.slow
def test_a_rebuild_killed_midway_goes_on_at_the_next_start(tiny_clip: Path, tmp_path: Path) -> None:
    corpus = Corpus(tmp_path / "photos", random.Random(0))
    db = tmp_path / "db"
    settings = Settings(model=str(tiny_clip), device="cpu", precision="fp32", db_dir=db, allow=[corpus.root])
    precreate(settings)
    env = isolated_env(tmp_path)

    def cli(folder: Path) -> list[str]:
        args = ["index", str(folder), "--model", str(tiny_clip), "--db", str(db), "--device", "cpu"]
        return [*cliplens_command(), *args, "--precision", "fp32"]

    first = Killer(cli(corpus.root), env, PROGRESS.search)
    assert first.finish() and first.proc.returncode == 0
    pickled = next(db.glob("*/index_metadata.pickle"))
    pickled.write_bytes(b"")  # what a kill in the middle of Chroma's save leaves
    corpus.mutate()
    run = Killer(cli(corpus.root), env, lambda out: "rebuilding the vector index" in out)
    assert run.working.wait(TIMEOUT), run.finish()
    assert run.kill_after(0.05), run.finish()
    plans = list((db / "rebuild").glob("*.json"))
    assert len(plans) == 1, run.finish()
    # Only a subfolder now: the other images come back through the rebuild's plan alone.
    final = Killer(cli(corpus.root / "sub"), env, lambda out: False)
    out = final.finish()
    assert final.proc.returncode == 0 and "is rebuilt" in out, out
    assert not plans[0].exists()
    fresh_process()
    check_store(settings, corpus)

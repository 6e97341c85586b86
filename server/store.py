"""The vector store: one Chroma collection per model and preprocessing version.

Each image is one record whose id is a hash of its absolute path, whose document is that
path (so folder filters are a prefix regex on it), and whose metadata holds the size,
mtime, content hash and pixel size. Writes are upserts, batched below Chroma's limit.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from . import health
from .encoder import PREPROCESSING_VERSION, ModelInfo
from .filters import Filters, TakenFrom
from .lock import StoreLock
from .records import ImageRecord, StoredImage, metadata, path_id, prefix_regex, to_stored

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# HNSW settings. Text queries lie outside the image cone (CLIP's modality gap), which is the
# hard case for a graph built from image-image distances: against CLIP-like vectors at 1M,
# recall@10 was 0.72 at ef_search 256, 0.83 at 512, 0.98 at 1024 and 1.00 at 2048, for a
# query of 6, 7, 8 and 8 ms (`cliplens bench`; Chroma's default of 100 is lower still).
HNSW_EF_SEARCH = 1024
HNSW_EF_CONSTRUCTION = 200
HNSW_MAX_NEIGHBORS = 24
# An unfiltered query for this many times top_k, filtered by folder here, is far cheaper
# than Chroma's regex pre-filter over every path; the filtered query is the fallback.
OVERFETCH = 4
# What a rebuild carries over from the collection it replaces (tests lower sync_threshold).
_KEPT_HNSW = ("space", "ef_search", "ef_construction", "max_neighbors", "resize_factor", "sync_threshold")


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""


def collection_name(info: ModelInfo) -> str:
    return f"cliplens-{info.fingerprint}"


def open_client(db_dir: Path | None, chroma_url: str | None) -> Any:
    """A PersistentClient on `db_dir`, or an HttpClient on a Chroma server URL."""
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
    if chroma_url:
        url = urlparse(chroma_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise StoreError(f"--chroma-url {chroma_url!r} is not an http(s) URL such as http://127.0.0.1:8000")
        port = url.port or (443 if url.scheme == "https" else 80)
        return chromadb.HttpClient(host=url.hostname, port=port, ssl=url.scheme == "https", settings=settings)
    if db_dir is None:
        raise StoreError("no store given: pass --db DIR or --chroma-url URL")
    db_dir.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(db_dir), settings=settings)


class ImageStore:
    """Records of one model's embeddings. `read_only` refuses writes with a clear error.

    With `db_dir` (the embedded store's folder) the vector index's files are checked when the
    store opens (see health.py); `damage` then says what is wrong, and searches refuse to run
    until the writer has rebuilt the index (rebuild.py), rather than answer wrongly.
    """

    def __init__(
        self,
        client: Any,
        info: ModelInfo,
        *,
        location: str,
        lock: StoreLock | None = None,
        db_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.info = info
        self.location = location
        self.lock = lock
        self.db_dir = db_dir
        self.read_only = lock is not None and not lock.held
        self.max_batch = int(client.get_max_batch_size())
        self._counted: tuple[float, int] | None = None  # (monotonic time, count)
        self.damage: str | None = None
        # Set by the rebuild (rebuild.py): what a search should tell while one runs.
        self.rebuild_note: Callable[[], str | None] = lambda: None
        name = collection_name(info)
        if self.read_only:
            # A read-only process must not create anything in a store that another owns.
            existing = {c.name for c in client.list_collections()}
            self._collection = client.get_collection(name, embedding_function=None) if name in existing else None
        else:
            self._collection = self._create({})
            self._widen_search(HNSW_EF_SEARCH)
        if self._collection is not None:
            stored = self._collection.metadata or {}
            if stored.get("dim") != info.dim or stored.get("fingerprint") != info.fingerprint:
                raise StoreError(
                    f"collection {name} in {location} was made by another model "
                    f"({stored.get('model')!r}, dim {stored.get('dim')}); reindex required"
                )
            # Before anything loads the index: some damage crashes the process at the first query.
            self.damage = health.check(
                self._collection, db_dir=db_dir, dim=info.dim, retries=2 if self.read_only else 0, where=location
            )

    def _create(self, hnsw: dict[str, Any]) -> Any:
        metadata = {
            "model": self.info.model_id,
            "model_type": self.info.model_type,
            "dim": self.info.dim,
            "fingerprint": self.info.fingerprint,
            "preprocessing_version": PREPROCESSING_VERSION,
            "schema_version": SCHEMA_VERSION,
        }
        config = {
            "space": "cosine",
            "ef_search": HNSW_EF_SEARCH,
            "ef_construction": HNSW_EF_CONSTRUCTION,
            "max_neighbors": HNSW_MAX_NEIGHBORS,
            **hnsw,
        }
        return self.client.get_or_create_collection(
            collection_name(self.info), metadata=metadata, configuration={"hnsw": config}, embedding_function=None
        )

    @property
    def collection_id(self) -> str | None:
        return None if self._collection is None else str(self._collection.id)

    def recorded_paths(self) -> list[str]:
        """Every path the collection records, read from SQLite: Chroma's own reads may fail
        while the vector index is broken, but the records survive there."""
        if self.db_dir is None or self.collection_id is None:
            raise StoreError("only an embedded store can be rebuilt from its records")
        return health.recorded_paths(self.db_dir, self.collection_id)

    def reset(self) -> None:
        """Drop the collection, records and vector index, and create it empty again, with
        the same HNSW settings. The caller has kept what it needs to refill it."""
        self.require_writable()
        current = ((self._collection.configuration or {}).get("hnsw") or {}) if self._collection is not None else {}
        kept = {k: v for k, v in current.items() if k in _KEPT_HNSW and v is not None}
        old = None
        if self.db_dir is not None and self.collection_id is not None:
            old = health.segment_dir(self.db_dir, self.collection_id)
        try:
            if self._collection is not None:
                self.client.delete_collection(collection_name(self.info))
            self._collection = self._create(kept)
        except Exception as exc:  # chromadb's own errors; nothing can go on without the collection
            raise StoreError(
                f"cannot recreate the damaged collection in {self.location}: {exc}; "
                "move that store folder away and index again"
            ) from exc
        if old is not None:
            # Chroma 1.5.9 leaves a deleted collection's index folder behind.
            shutil.rmtree(old, ignore_errors=True)
        self.damage = None
        self._counted = None

    def _widen_search(self, ef_search: int) -> None:
        # Collections made before this setting existed keep their own ef_search: raise it.
        # Chroma applies it when the index is next loaded, which has not happened yet here.
        assert self._collection is not None
        current = (self._collection.configuration or {}).get("hnsw") or {}
        if int(current.get("ef_search") or 0) < ef_search:
            self._collection.modify(configuration={"hnsw": {"ef_search": ef_search}})

    def require_writable(self) -> Any:
        if self.read_only:
            holder = self.lock.holder() if self.lock else "another process"
            raise StoreError(
                f"the store at {self.location} is locked by another cliplens process ({holder}); "
                "this one can only search. Index from that process, stop it, or use a different --db."
            )
        return self._collection

    def count(self, *, max_age: float = 0.0) -> int:
        """Records in the collection. Counting costs ~6 ms at 100k records, a third of a
        search: with `max_age`, a count that recent (and no write since, from this process)
        is reused. Other processes' writes show up once it expires."""
        if self._collection is None:
            return 0
        now = time.monotonic()
        cached = self._counted
        if cached is not None and max_age > 0 and now - cached[0] <= max_age:
            return cached[1]
        total = int(self._collection.count())
        self._counted = (now, total)
        return total

    def entries_under(self, folder: Path, *, recursive: bool = True) -> dict[str, StoredImage]:
        """Stored images under `folder` (direct children only when not recursive), by path."""
        found: dict[str, StoredImage] = {}
        if self._collection is None:
            return found
        # Few large pages: every page is a new regex scan over all paths (1k pages: 1.0 s for
        # 20k entries; one 20k page: 0.43 s).
        page = 50_000
        offset = 0
        while True:
            got = self._collection.get(
                where_document={"$regex": prefix_regex(folder)},
                include=["documents", "metadatas"],
                limit=page,
                offset=offset,
            )
            docs = got["documents"] or []
            for doc, meta in zip(docs, got["metadatas"] or [], strict=True):
                if recursive or Path(doc).parent == folder:
                    found[doc] = to_stored(doc, dict(meta))
            if len(docs) < page:
                return found
            offset += page

    def entries_for(self, paths: Sequence[str]) -> dict[str, StoredImage]:
        """Stored images at exactly these paths, by path (for files reached through links)."""
        found: dict[str, StoredImage] = {}
        if self._collection is None:
            return found
        for batch in self._batches(list(paths)):
            got = self._collection.get(ids=[path_id(p) for p in batch], include=["documents", "metadatas"])
            for doc, meta in zip(got["documents"] or [], got["metadatas"] or [], strict=True):
                found[doc] = to_stored(doc, dict(meta))
        return found

    def embeddings_by_hash(self, hashes: Sequence[str]) -> dict[str, tuple[StoredImage, np.ndarray]]:
        """A stored image and its embedding for each content hash already in the store.

        Reuse is an optimisation: when the vectors cannot be read back (a Chroma server whose
        index another writer has not flushed yet answers "Nothing found on disk"), the files
        are simply embedded again.
        """
        unique = list(dict.fromkeys(hashes))
        if self._collection is None or not unique:
            return {}
        # Metadata first (SQLite only, cheap when nothing matches, the common case).
        matches: dict[str, StoredImage] = {}
        for batch in self._batches(unique):
            got = self._collection.get(where={"content_hash": {"$in": list(batch)}}, include=["documents", "metadatas"])
            for doc, meta in zip(got["documents"] or [], got["metadatas"] or [], strict=True):
                stored = to_stored(doc, dict(meta))
                matches.setdefault(stored.content_hash, stored)
        if not matches:
            return {}
        try:
            vectors = self.vectors_for([s.path for s in matches.values()])
        except Exception as exc:  # chromadb raises InternalError and friends; none is fatal here
            log.warning("could not read stored vectors for reuse (%s); embedding those files again", exc)
            return {}
        return {s.content_hash: (s, vectors[s.path]) for s in matches.values() if s.path in vectors}

    def _batches(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        for start in range(0, len(items), self.max_batch):
            yield items[start : start + self.max_batch]

    def upsert(self, records: Sequence[ImageRecord]) -> None:
        collection = self.require_writable()
        self._counted = None
        for batch in self._batches(records):
            vectors = np.stack([r.embedding for r in batch]).astype(np.float32)
            if vectors.shape[1] != self.info.dim:
                raise StoreError(f"embedding size {vectors.shape[1]} does not match the store's {self.info.dim}")
            if not np.isfinite(vectors).all():
                raise StoreError("refusing to store non-finite embeddings (NaN or inf) from the model")
            collection.upsert(
                ids=[path_id(r.image.path) for r in batch],
                embeddings=vectors,
                documents=[r.image.path for r in batch],
                metadatas=[metadata(r.image) for r in batch],
            )

    def delete(self, paths: Sequence[str]) -> None:
        collection = self.require_writable()
        self._counted = None
        for batch in self._batches(list(paths)):
            collection.delete(ids=[path_id(p) for p in batch])

    def require_intact(self) -> None:
        """Raise StoreError when the vector index is damaged: reading it could answer wrongly."""
        if self.damage is not None:
            holder = self.lock.holder() if self.lock else "another process"
            raise StoreError(
                f"the vector index of the store at {self.location} is damaged ({self.damage[:300]}), so a search "
                f"could answer wrongly. The process that holds the store ({holder}) rebuilds it from the image "
                "files when it starts: restart it, or stop it and run `cliplens index` on any folder."
            )

    def query(
        self, vector: np.ndarray, k: int, folders: Sequence[Path], filters: Filters | None = None
    ) -> list[tuple[StoredImage, float]]:
        """The `k` nearest stored images under any of `folders` that pass `filters`, with their
        cosine, best first."""
        self.require_intact()
        if self._collection is None or not folders:
            return []
        prefixes = tuple(str(f).rstrip(os.sep) + os.sep for f in folders)
        query = np.asarray(vector, np.float32)
        wanted = k * OVERFETCH
        active = filters if filters is not None and filters.active() else None
        hits = [
            h
            for h in self._nearest(query, wanted, None)
            if h[0].path.startswith(prefixes) and (active is None or active.matches(h[0]))
        ]
        if len(hits) < k and len(hits) < self.count():
            # Too few of the nearest lie in these folders or pass the filters: ask Chroma to
            # filter, which scans every path but cannot come back short.
            clauses = [{"$regex": prefix_regex(f)} for f in folders]
            where = clauses[0] if len(clauses) == 1 else {"$or": clauses}
            hits = self._nearest(query, k, where, active.where() if active else None)
        return hits[:k]

    def vectors_for(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored embedding of each of these paths that is in the store."""
        found: dict[str, np.ndarray] = {}
        if self._collection is None:
            return found
        for batch in self._batches(list(dict.fromkeys(paths))):
            got = self._collection.get(ids=[path_id(p) for p in batch], include=["documents", "embeddings"])
            vectors = got["embeddings"] if got["embeddings"] is not None else []
            for doc, vector in zip(got["documents"] or [], vectors, strict=True):
                found[doc] = np.asarray(vector, np.float32)
        return found

    def vectors_under(self, folder: Path, *, limit: int) -> tuple[list[StoredImage], np.ndarray]:
        """Every stored image under `folder` and its embedding, (M, D), in path order.

        Raises:
            StoreError: more than `limit` images are stored there.
        """
        entries = self.entries_under(folder)
        if len(entries) > limit:
            raise StoreError(
                f"{len(entries)} images are indexed under {folder}; the limit for one call is {limit}: pick a subfolder"
            )
        paths = sorted(entries)
        vectors = self.vectors_for(paths)
        kept = [entries[p] for p in paths if p in vectors]
        matrix = np.stack([vectors[s.path] for s in kept]) if kept else np.zeros((0, self.info.dim), np.float32)
        return kept, matrix

    def set_taken(self, dates: dict[str, tuple[int, TakenFrom]]) -> None:
        """Record capture dates on records written before dates were kept (metadata only)."""
        collection = self.require_writable()
        entries = self.entries_for(list(dates))
        updated = [replace(entries[p], taken=dates[p][0], taken_from=dates[p][1]) for p in dates if p in entries]
        for batch in self._batches(updated):
            collection.update(ids=[path_id(s.path) for s in batch], metadatas=[metadata(s) for s in batch])

    def _nearest(
        self, vector: np.ndarray, n: int, where: dict[str, Any] | None, where_metadata: dict[str, Any] | None = None
    ) -> list[tuple[StoredImage, float]]:
        try:
            got = self._collection.query(  # type: ignore[union-attr]
                query_embeddings=[vector],
                n_results=n,
                where_document=where,
                where=where_metadata,
                include=["documents", "metadatas", "distances"],
            )
        except Exception as exc:  # chromadb's InternalError; its type moves between releases
            if not self.read_only:
                raise
            # The owner keeps new vectors in memory and writes the index to disk in batches
            # (every 1000 records, and when it closes): until then this process sees records
            # in SQLite that have no vectors on disk, and Chroma cannot answer.
            holder = self.lock.holder() if self.lock else "another process"
            raise StoreError(
                f"the store at {self.location} is being written by another cliplens process ({holder}), which "
                f"has not saved its vector index to disk yet ({str(exc)[:120]}); search from that process, "
                "or again once it has finished indexing"
            ) from exc
        hits = []
        for doc, meta, dist in zip(got["documents"][0], got["metadatas"][0], got["distances"][0], strict=True):
            # Chroma's cosine space stores 1 - cosine.
            hits.append((to_stored(doc, dict(meta)), float(1.0 - dist)))
        hits.sort(key=lambda h: h[1], reverse=True)
        return hits

"""The vector store: one Chroma collection per model and preprocessing version.

Each image is one record whose id is a hash of its absolute path, whose document is that
path (so folder filters are a prefix regex on it), and whose metadata holds the size,
mtime, content hash and pixel size. Writes are upserts, batched below Chroma's limit.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from .encoder import PREPROCESSING_VERSION, ModelInfo
from .lock import StoreLock

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Rust's regex crate (Chroma's $regex) treats these as meta characters.
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class StoredImage:
    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageRecord:
    image: StoredImage
    embedding: np.ndarray  # (D,) float32, unit length


def path_id(path: str) -> str:
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def prefix_regex(folder: Path) -> str:
    """A regex matching every path strictly under `folder`, component-wise."""
    text = str(folder)
    if not text.endswith(os.sep):
        text += os.sep
    return "^" + "".join("\\" + ch if ch in _REGEX_META else ch for ch in text)


def _to_stored(doc: str, meta: dict[str, Any]) -> StoredImage:
    return StoredImage(
        path=doc,
        size=int(meta["size"]),
        # Chroma keeps ints as i64: mtime_ns fits.
        mtime_ns=int(meta["mtime_ns"]),
        content_hash=str(meta["content_hash"]),
        width=int(meta["width"]),
        height=int(meta["height"]),
    )


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
    """Records of one model's embeddings. `read_only` refuses writes with a clear error."""

    def __init__(self, client: Any, info: ModelInfo, *, location: str, lock: StoreLock | None = None) -> None:
        self.client = client
        self.info = info
        self.location = location
        self.lock = lock
        self.read_only = lock is not None and not lock.held
        self.max_batch = int(client.get_max_batch_size())
        name = collection_name(info)
        metadata = {
            "model": info.model_id,
            "model_type": info.model_type,
            "dim": info.dim,
            "fingerprint": info.fingerprint,
            "preprocessing_version": PREPROCESSING_VERSION,
            "schema_version": SCHEMA_VERSION,
        }
        if self.read_only:
            # A read-only process must not create anything in a store that another owns.
            existing = {c.name for c in client.list_collections()}
            self._collection = client.get_collection(name, embedding_function=None) if name in existing else None
        else:
            self._collection = client.get_or_create_collection(
                name, metadata=metadata, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
            )
        if self._collection is not None:
            stored = self._collection.metadata or {}
            if stored.get("dim") != info.dim or stored.get("fingerprint") != info.fingerprint:
                raise StoreError(
                    f"collection {name} in {location} was made by another model "
                    f"({stored.get('model')!r}, dim {stored.get('dim')}); reindex required"
                )

    def require_writable(self) -> Any:
        if self.read_only:
            holder = self.lock.holder() if self.lock else "another process"
            raise StoreError(
                f"the store at {self.location} is locked by another cliplens process ({holder}); "
                "this one can only search. Index from that process, stop it, or use a different --db."
            )
        return self._collection

    def count(self) -> int:
        return 0 if self._collection is None else int(self._collection.count())

    def entries_under(self, folder: Path, *, recursive: bool = True) -> dict[str, StoredImage]:
        """Stored images under `folder` (direct children only when not recursive), by path."""
        found: dict[str, StoredImage] = {}
        if self._collection is None:
            return found
        page = 1000
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
                    found[doc] = _to_stored(doc, dict(meta))
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
                found[doc] = _to_stored(doc, dict(meta))
        return found

    def _batches(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        for start in range(0, len(items), self.max_batch):
            yield items[start : start + self.max_batch]

    def upsert(self, records: Sequence[ImageRecord]) -> None:
        collection = self.require_writable()
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
                metadatas=[
                    {
                        "size": r.image.size,
                        "mtime_ns": r.image.mtime_ns,
                        "content_hash": r.image.content_hash,
                        "width": r.image.width,
                        "height": r.image.height,
                    }
                    for r in batch
                ],
            )

    def delete(self, paths: Sequence[str]) -> None:
        collection = self.require_writable()
        for batch in self._batches(list(paths)):
            collection.delete(ids=[path_id(p) for p in batch])

    def query(self, vector: np.ndarray, k: int, folders: Sequence[Path]) -> list[tuple[StoredImage, float]]:
        """The `k` nearest stored images under any of `folders`, with their cosine, best first."""
        if self._collection is None or not folders or self.count() == 0:
            return []
        clauses = [{"$regex": prefix_regex(f)} for f in folders]
        where = clauses[0] if len(clauses) == 1 else {"$or": clauses}
        got = self._collection.query(
            query_embeddings=[np.asarray(vector, np.float32)],
            n_results=k,
            where_document=where,
            include=["documents", "metadatas", "distances"],
        )
        hits = []
        for doc, meta, dist in zip(got["documents"][0], got["metadatas"][0], got["distances"][0], strict=True):
            # Chroma's cosine space stores 1 - cosine.
            hits.append((_to_stored(doc, dict(meta)), float(1.0 - dist)))
        hits.sort(key=lambda h: h[1], reverse=True)
        return hits

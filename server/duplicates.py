"""Duplicate grouping: identical files by content hash, near-duplicates by image-image cosine.

Near-duplicates are the connected components of the graph whose edges join two images with
cosine ≥ threshold. The cosines are computed a block of rows at a time against the rows after
it (the upper triangle: each pair once), so memory stays bounded by BLOCK_ELEMENTS floats
whatever the folder size, and the components are merged block by block with a vectorised
union-find (no per-pair Python loop: a low threshold can join millions of pairs).

Components chain: A~B and B~C put A and C in one group even when A and C are far apart, so
each group reports the lowest cosine between any two of its members.

`python -m cliplens.server.duplicates --bench` times the grouping on random unit vectors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .records import StoredImage

# 32M float32 cosines (128 MB) per block; rows per block = BLOCK_ELEMENTS // images, at most MAX_BLOCK_ROWS.
BLOCK_ELEMENTS = 1 << 25
MAX_BLOCK_ROWS = 2048
# Edges are pulled out of a block this many cosines at a time, so that a threshold low enough
# to join nearly every pair does not need 16 bytes per pair of the whole block at once.
EDGE_CHUNK_ELEMENTS = 1 << 22
# float32 dot products of two copies of one unit vector can land a hair under 1.0.
COSINE_SLACK = 1e-6

Kind = Literal["exact", "near"]


@dataclass(frozen=True)
class DuplicateGroup:
    kind: Kind
    members: list[int]  # indices into the images, the suggested keeper first, then in index order
    keep_reason: str
    min_cosine: float  # over every pair of members
    max_cosine: float


def _compress(parent: np.ndarray) -> None:
    """Point every node straight at its root (pointer jumping), in place."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def union_pairs(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the sets of a[k] and b[k] for every k, in place. `parent` must be compressed
    (every entry a root) on entry and is compressed again on return.

    Each round hooks the larger root of every still-split pair onto the smaller one; roots only
    ever point lower, so no cycle can form, and every round joins at least one pair's sets.
    """
    while a.size:
        ra, rb = parent[a], parent[b]
        split = ra != rb
        if not split.any():
            return
        a, b, ra, rb = a[split], b[split], ra[split], rb[split]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        _compress(parent)


def near_components(vectors: np.ndarray, threshold: float) -> list[list[int]]:
    """Connected components, of two or more, of the graph cos(i, j) ≥ threshold over the rows
    of (N, D) unit `vectors`; each sorted, in order of their first member."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = x.shape[0]
    parent = np.arange(n, dtype=np.int64)
    if n < 2:
        return []
    rows = max(1, min(MAX_BLOCK_ROWS, BLOCK_ELEMENTS // n))
    cut = np.float32(threshold - COSINE_SLACK)
    # Each pair once: in a block's own square only the cells right of the diagonal count.
    right_of_diagonal = np.triu(np.ones((rows, rows), dtype=bool), k=1)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sims = x[start:stop] @ x[start:].T  # (stop - start, n - start): column c is image start + c
        step = max(1, EDGE_CHUNK_ELEMENTS // sims.shape[1])
        for r in range(0, stop - start, step):
            hit = sims[r : r + step] >= cut
            hit[:, : stop - start] &= right_of_diagonal[r : r + hit.shape[0], : stop - start]
            ri, ci = np.nonzero(hit)
            if ri.size:
                union_pairs(parent, ri + (start + r), ci + start)
    roots, counts = np.unique(parent, return_counts=True)
    grouped = set(roots[counts > 1].tolist())
    groups: dict[int, list[int]] = {}
    for i, root in enumerate(parent.tolist()):
        if root in grouped:
            groups.setdefault(root, []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def exact_components(hashes: Sequence[str]) -> list[list[int]]:
    """Indices that share a content hash (identical bytes), groups of two or more, each sorted."""
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(i)
    return sorted((g for g in by_hash.values() if len(g) > 1), key=lambda g: g[0])


def cosine_range(vectors: np.ndarray, members: Sequence[int]) -> tuple[float, float]:
    """The lowest and highest cosine between two different members, in row blocks."""
    x = np.ascontiguousarray(vectors[list(members)], dtype=np.float32)
    m = x.shape[0]
    low, high = np.inf, -np.inf
    rows = max(1, min(MAX_BLOCK_ROWS, BLOCK_ELEMENTS // max(m, 1)))
    for start in range(0, m - 1, rows):
        stop = min(m, start + rows)
        sims = x[start:stop] @ x[start:].T
        upper = np.triu(np.ones((stop - start, m - start), dtype=bool), k=1)
        values = sims[upper]
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    # Clipped: rounding puts a copy's cosine a hair above 1.
    return min(1.0, low), min(1.0, high)


def suggest_keep(images: Sequence[StoredImage], members: Sequence[int]) -> tuple[int, str]:
    """Which member to keep: the most pixels, then the largest file, then the earliest capture
    date, then the first path; and why, in words."""

    def key(i: int) -> tuple[int, int, float, str]:
        s = images[i]
        taken = float(s.taken) if s.taken is not None else float("inf")
        return (-s.width * s.height, -s.size, taken, s.path)

    ranked = sorted(members, key=key)
    best, rest = images[ranked[0]], [images[i] for i in ranked[1:]]
    pixels = best.width * best.height
    if all(pixels > s.width * s.height for s in rest):
        why = f"the most pixels ({best.width}x{best.height})"
    elif all(pixels > s.width * s.height or best.size > s.size for s in rest):
        why = f"the most pixels ({best.width}x{best.height}) and, among those, the largest file ({best.size} bytes)"
    elif len({(s.width, s.height, s.size) for s in (best, *rest)}) == 1:
        why = "all have the same pixels and file size: the earliest dated, then the first by path"
    else:
        why = "tied on pixels and file size with another member: the earliest dated, then the first by path"
    return ranked[0], why


def find_duplicate_groups(images: Sequence[StoredImage], vectors: np.ndarray, threshold: float) -> list[DuplicateGroup]:
    """Exact groups (same content hash), then near groups among one file per distinct content
    (the exact group's keeper stands for its copies), by cosine ≥ threshold.

    Sorted by size (largest first), then by lowest cosine (tightest first), exact before near.
    """
    if len(images) != vectors.shape[0]:
        raise ValueError(f"{len(images)} images but {vectors.shape[0]} vectors")
    groups: list[DuplicateGroup] = []
    stands_for: dict[int, int] = {}  # an exact copy that is not kept -> the keeper
    for members in exact_components([s.content_hash for s in images]):
        keep, why = suggest_keep(images, members)
        low, high = cosine_range(vectors, members)
        groups.append(DuplicateGroup("exact", _keeper_first(keep, members), f"identical bytes; {why}", low, high))
        stands_for.update({i: keep for i in members if i != keep})
    distinct = [i for i in range(len(images)) if i not in stands_for]
    for component in near_components(vectors[distinct], threshold):
        members = [distinct[k] for k in component]
        keep, why = suggest_keep(images, members)
        low, high = cosine_range(vectors, members)
        groups.append(DuplicateGroup("near", _keeper_first(keep, members), why, low, high))
    groups.sort(key=lambda g: (-len(g.members), -g.min_cosine, g.kind != "exact", min(g.members)))
    return groups


def _keeper_first(keep: int, members: Sequence[int]) -> list[int]:
    return [keep, *sorted(i for i in members if i != keep)]


def brute_force_components(vectors: np.ndarray, threshold: float) -> list[list[int]]:
    """The same components by a full matrix and a plain depth-first search: a reference for tests."""
    x = np.asarray(vectors, dtype=np.float64)
    adjacent = (x @ x.T) >= threshold - COSINE_SLACK
    seen = np.zeros(len(x), dtype=bool)
    out: list[list[int]] = []
    for i in range(len(x)):
        if seen[i]:
            continue
        seen[i] = True
        stack, component = [i], [i]
        while stack:
            for j in np.flatnonzero(adjacent[stack.pop()] & ~seen).tolist():
                seen[j] = True
                stack.append(j)
                component.append(j)
        if len(component) > 1:
            out.append(sorted(component))
    return sorted(out, key=lambda g: g[0])


def planted_vectors(n: int, dim: int, *, pairs: int, noise: float, seed: int) -> np.ndarray:
    """(n, dim) random unit vectors; `pairs` of them are noisy copies of others (planted
    near-duplicates, some of them chained into larger groups)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    for _ in range(pairs):
        src, dst = rng.integers(0, n, size=2)
        x[dst] = x[src] + noise * np.linalg.norm(x[src]) * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench(n: int, dim: int = 512, threshold: float = 0.95, seed: int = 0) -> dict[str, float]:
    x = planted_vectors(n, dim, pairs=n // 100, noise=0.2, seed=seed)
    began = time.perf_counter()
    groups = near_components(x, threshold)
    seconds = time.perf_counter() - began
    return {"images": n, "dim": dim, "groups": len(groups), "seconds": round(seconds, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cliplens.server.duplicates")
    parser.add_argument("--bench", type=int, nargs="*", default=[], metavar="N", help="default: 10000 50000")
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    for n in args.bench or [10_000, 50_000]:
        sys.stdout.write(json.dumps(bench(n, args.dim)) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

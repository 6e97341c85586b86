"""A search query as weighted terms: words and example images, added and subtracted.

Grammar (one line):

    query  := ["-"] term (" + " term | " - " term)*
    term   := [weight ("*" | " * ")] body
    weight := a plain decimal, e.g. 0.5 or 2
    body   := "quoted text" | an image path | text

Operators need a space on each side, so "t-shirt", "x-ray" and "1+1" stay words. A body is
an image when it names an image file inside the allowed folders (absolute, or relative to
the searched folder or an allowed root); one that looks like a path (absolute, or ending in
an image extension) but names no such file is an error, so a typo never turns silently into
words. Quotes force text.

The query vector is normalise(Σ w_i v_i) over unit term vectors v_i, so each term's share of
a hit's score is w_i · cos(v_i, x) / ‖Σ w_j v_j‖, and the shares add up to the score.

CLIP does not understand negation: "a street without cars" lands next to "a street with
cars", since the caption still names cars. `negation_rewrite` offers the subtraction instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from .encoder import ClipEncoder
from .images import IMAGE_EXTENSIONS, load_pictures
from .paths import MAX_SHOWN_PATH, PathError, PathPolicy, shown
from .store import ImageStore

MAX_TERMS = 8
MIN_WEIGHT, MAX_WEIGHT = 0.01, 10.0
MIN_COMBINED_NORM = 1e-3  # below this the terms cancel out and there is no direction left to search

TermKind = Literal["text", "image"]

_WEIGHT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*\*\s*(.*)$", re.DOTALL)
_NUMBER_STAR = re.compile(r"^[-+]?[\d.]*\s*\*")


@dataclass(frozen=True)
class Term:
    kind: TermKind
    body: str  # the text, or the path as the caller wrote it
    weight: float  # signed: a " - " term is negative
    quoted: bool = False
    path: Path | None = None  # the resolved file, for an image term

    def shown(self) -> str:
        return shown(str(self.path), MAX_SHOWN_PATH) if self.path is not None else shown(self.body, MAX_SHOWN_PATH)


def _opens_term(before: str) -> bool:
    """Whether a quote after `before` (this term's text so far) starts the term's body."""
    return not before.strip() or re.fullmatch(r"\s*(\d+(\.\d*)?|\.\d+)\s*\*\s*", before) is not None


def _split(query: str, quotes: bool = True) -> list[tuple[int, str]]:
    """(sign, raw term) pieces, cut at " + " and " - " outside quoted terms. Only a quote that
    starts a term's body opens one; any other quote, or one never closed, is a literal character
    ('a 5" screen')."""
    pieces: list[tuple[int, str]] = []
    text = query.strip()
    sign = 1
    if text.startswith("-"):  # a leading minus subtracts the first term: "-person + a beach"
        sign, text = -1, text[1:].lstrip()
    start, in_quote, i = 0, False, 0
    while i < len(text):
        ch = text[i]
        if ch == '"' and quotes and (in_quote or _opens_term(text[start:i])):
            in_quote = not in_quote
        elif not in_quote and ch in "+-" and 0 < i < len(text) - 1 and text[i - 1] == " " and text[i + 1] == " ":
            pieces.append((sign, text[start : i - 1]))
            sign = 1 if ch == "+" else -1
            start = i + 2
            i += 1
        i += 1
    if in_quote:
        return _split(query, quotes=False)
    pieces.append((sign, text[start:]))
    return pieces


def _looks_like_path(body: str) -> bool:
    return body.startswith(("/", "~")) or Path(body).suffix.lower() in IMAGE_EXTENSIONS


def _resolve_image(body: str, policy: PathPolicy, folder: Path | None) -> Path | None:
    """The image file a term names inside the allowed folders; None when it names none.

    Raises PathError when it names a file outside them (a link's target is never named).
    """
    if Path(body).suffix.lower() not in IMAGE_EXTENSIONS:
        return None
    candidates = [body] if body.startswith(("/", "~")) else []
    if not candidates:
        bases = ([folder] if folder is not None else []) + list(policy.roots)
        candidates = [str(base / body) for base in dict.fromkeys(bases)]
    for candidate in candidates:
        try:
            return policy.resolve(candidate, want="file")
        except PathError as exc:
            if "does not exist" not in str(exc):
                raise PathError(f"query term {shown(body, 200)!r}: {exc}") from None
    return None


def parse_query(query: str, policy: PathPolicy, folder: Path | None = None) -> list[Term]:
    """The query's terms, in order; ValueError names the bad term or weight and what is allowed."""
    pieces = _split(query)
    if len(pieces) > MAX_TERMS:
        raise ValueError(
            f"query has {len(pieces)} terms; at most {MAX_TERMS} are allowed (terms are cut at ' + ' and ' - ')"
        )
    terms: list[Term] = []
    for sign, raw in pieces:
        body = raw.strip()
        weight = 1.0
        if match := _WEIGHT.match(body):
            weight, body = float(match.group(1)), match.group(2).strip()
            if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
                raise ValueError(
                    f"weight {match.group(1)} in term {shown(raw.strip(), 200)!r} is out of range: "
                    f"use {MIN_WEIGHT} to {MAX_WEIGHT:g}, and ' - ' to subtract"
                )
        elif _NUMBER_STAR.match(body):
            raise ValueError(
                f"term {shown(body, 200)!r} has a weight that is not a plain number: write e.g. '0.5 * beach.jpg', "
                "and ' - ' to subtract"
            )
        if not body or body in "+-" or body.endswith((" +", " -")) or body.startswith(("+ ", "- ")):
            raise ValueError(
                f"query {shown(query, 200)!r} has an empty term around an operator: "
                "write terms between ' + ' and ' - ', e.g. 'a red bicycle - red'"
            )
        quoted = len(body) >= 2 and body[0] == body[-1] == '"'
        if quoted:
            body = body[1:-1].strip()
            if not body:
                raise ValueError(f'query {shown(query, 200)!r} has an empty quoted term ""')
        path = None if quoted else _resolve_image(body, policy, folder)
        if path is None and not quoted and _looks_like_path(body):
            raise ValueError(
                f"query term {shown(body, 200)!r} looks like an image path but names no image file inside the "
                f"allowed folders ({', '.join(str(r) for r in policy.roots)}); give a path to one, relative to the "
                f'searched folder or absolute, or quote it ("...") to search for those words'
            )
        terms.append(Term("image" if path else "text", body, sign * weight, quoted, path))
    if not any(t.weight > 0 for t in terms):
        raise ValueError(
            f"query {shown(query, 200)!r} only subtracts: give at least one term to look for, e.g. 'a street - cars'"
        )
    return terms


def format_query(terms: Sequence[Term]) -> str:
    """The terms written back in the grammar above."""
    out = []
    for i, term in enumerate(terms):
        body = f'"{term.body}"' if term.quoted else term.body
        size = abs(term.weight)
        text = body if math.isclose(size, 1.0) else f"{size:g} * {body}"
        if i == 0:
            out.append(text if term.weight > 0 else f"- {text}")
        else:
            out.append(f"{'+' if term.weight > 0 else '-'} {text}")
    return " ".join(out)


def term_vectors(encoder: ClipEncoder, store: ImageStore, policy: PathPolicy, terms: Sequence[Term]) -> np.ndarray:
    """(T, D) unit vectors, one per term. An image that is indexed and unchanged since uses its
    stored vector; any other is embedded now."""
    vectors: list[np.ndarray | None] = [None] * len(terms)
    texts = [i for i, t in enumerate(terms) if t.kind == "text"]
    if texts:
        for i, vec in zip(texts, encoder.embed_texts([terms[i].body for i in texts]), strict=True):
            vectors[i] = vec
    images = [i for i, t in enumerate(terms) if t.path is not None]
    paths = [str(terms[i].path) for i in images]
    entries = store.entries_for(paths) if paths else {}
    fresh = {}
    for p in paths:
        entry = entries.get(p)
        try:
            stat = Path(p).stat()
        except OSError:  # gone since it was resolved: loading it below says so
            continue
        if entry is not None and entry.size == stat.st_size and entry.mtime_ns == stat.st_mtime_ns:
            fresh[p] = entry
    stored = store.vectors_for(list(fresh)) if fresh else {}
    missing = list(dict.fromkeys(p for p in paths if p not in stored))
    if missing:
        embedded = encoder.embed_images(load_pictures([Path(p) for p in missing], policy.roots))
        stored.update(zip(missing, embedded, strict=True))
    for i, p in zip(images, paths, strict=True):
        vectors[i] = stored[p]
    matrix = np.stack([np.asarray(v, np.float64) for v in vectors if v is not None])
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def combine(
    vectors: np.ndarray, weights: np.ndarray | Sequence[float], what: str = "the query's terms"
) -> tuple[np.ndarray, float]:
    """(unit query vector, ‖Σ w_i v_i‖); ValueError when the terms cancel out."""
    total = np.asarray(weights, np.float64) @ vectors
    norm = float(np.linalg.norm(total))
    if norm < MIN_COMBINED_NORM:
        raise ValueError(
            f"{what} cancel out (the weighted sum has length {norm:.2g}): there is no direction left to search; "
            "change a weight or drop a term"
        )
    return total / norm, norm


# --- negation -------------------------------------------------------------------------------

_CUES = ("not", "no", "without", "except", "excluding", "never", "nor")
_CUE = re.compile(r"\b(?:not|no|without|except|excluding|never|nor|cannot)\b|\b\w+n't\b|\bnon-\w+", re.IGNORECASE)
_NON = re.compile(r"\bnon-(\w+)", re.IGNORECASE)
_CONTRACTION = re.compile(r"\b\w+n't\b|\bcannot\b", re.IGNORECASE)
# Words left dangling before a negation ("a bicycle that is not red") or after it ("doesn't have a").
_TRAILING = frozenset("that which who is are was were be does do did has have with but and or it its there any".split())  # noqa: SIM905
_LEADING = frozenset("have has any contain containing include including show showing with a an the be is".split())  # noqa: SIM905
_JOINERS = re.compile(r"\s*(?:,|\bor\b|\band\b|\bnor\b)\s*", re.IGNORECASE)


def has_negation(text: str) -> bool:
    return _CUE.search(text) is not None


def _strip_words(words: list[str], drop: frozenset[str], *, from_end: bool) -> list[str]:
    while words and words[-1 if from_end else 0].lower().strip(",") in drop:
        words = words[:-1] if from_end else words[1:]
    return words


def _rewrite_text(text: str) -> tuple[str, list[str]] | None:
    """("what to look for", [what to subtract]) for one negated phrase, or None when no rewrite
    keeps something to look for ("not a cat" alone has nothing left)."""
    negatives = [m.group(1) for m in _NON.finditer(text)]
    text = re.sub(r"\s+", " ", _NON.sub("", text)).strip()
    cue = re.search(r"\b(?:not|no|without|except|excluding|never)\b|\b\w+n't\b|\bcannot\b", text, re.IGNORECASE)
    if cue:
        left = _strip_words(text[: cue.start()].split(), _TRAILING, from_end=True)
        rest = text[cue.end() :]
        for part in _JOINERS.split(rest):
            words = [w for w in part.split() if w.lower() not in _CUES and not _CONTRACTION.fullmatch(w)]
            words = _strip_words(words, _LEADING, from_end=False)
            kept = " ".join(words).strip(" .,;")
            if kept:
                negatives.append(kept)
        text = " ".join(left)
    positive = text.strip(" .,;")
    if not positive or not negatives:
        return None
    return positive, list(dict.fromkeys(negatives))


def negation_rewrite(terms: Sequence[Term]) -> list[Term] | None:
    """The terms with each negated text term turned into a subtraction; None when there is
    nothing to rewrite. Quoted terms are left as written; so are subtracted ones."""
    out: list[Term] = []
    changed = False
    for term in terms:
        rewritten = None
        if term.kind == "text" and not term.quoted and term.weight > 0 and has_negation(term.body):
            rewritten = _rewrite_text(term.body)
        if rewritten is None:
            out.append(term)
            continue
        positive, negatives = rewritten
        changed = True
        out.append(replace(term, body=positive))
        out.extend(Term("text", neg, -term.weight) for neg in negatives)
    if not changed:
        return None
    if len(out) > MAX_TERMS:
        return None
    return out


def negation_cues(terms: Sequence[Term]) -> list[str]:
    """The negation words in the unquoted text terms, as written."""
    found: list[str] = []
    for term in terms:
        if term.kind == "text" and not term.quoted:
            found.extend(m.group(0) for m in _CUE.finditer(term.body))
    return list(dict.fromkeys(found))

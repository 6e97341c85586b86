"""Path policy: the server may read only inside folders the user allowed.

Every path that comes from a client goes through :meth:`PathPolicy.resolve`, and
every folder scan goes through :meth:`PathPolicy.walk`. Both compare *real* paths
(symlinks followed) component-wise against the allowed roots, so neither a
symlink nor a name like ``/photos2`` can reach outside ``/photos``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Literal

ALLOW_ENV = "CLIPLENS_ALLOW"
MAX_PATH_CHARS = 4096
MAX_SHOWN_PATH = 1024  # a path sent back to the client is cut here: it is data, not a payload

# Skip reasons reported by walk(); callers can show them to the user.
SKIP_OUTSIDE = "outside_allowed"
SKIP_BROKEN = "broken_symlink"
SKIP_UNREADABLE_DIR = "unreadable_dir"
SKIP_UNREADABLE = "unreadable"  # an entry whose type could not be read (stat failed)
SKIP_MAX_FILES = "max_files_reached"
SKIP_NOT_A_FILE = "not_a_file"  # a FIFO, socket or device under an image's name: never opened


def is_utf8(text: str) -> bool:
    """False for a str holding os.fsdecode's stand-ins for bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(text: str, limit: int) -> str:
    """Text from disk (a file name) made safe to return as a data field: bytes that are not
    UTF-8 become \\xNN escapes (JSON cannot carry them), and it is cut to `limit` characters."""
    if not is_utf8(text):
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that stands for no byte (not from os.fsdecode)
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def open_beneath(roots: Sequence[Path], path: Path, flags: int) -> int:
    """Open `path`, a real path inside one of `roots`, without following a symlink anywhere below
    that root: each folder is opened relative to the one above it with O_NOFOLLOW, then the file.

    Checking a path and then opening it is a race: a folder swapped for a symlink in between
    would lead the open outside the roots (a checked real path is only true when checked).
    Opening component by component from the root makes the open itself the check.
    """
    root = next((r for r in roots if path == r or path.is_relative_to(r)), None)
    if root is None:
        raise PermissionError(errno.EACCES, "outside the allowed folders")
    parts = path.relative_to(root).parts
    if not parts or os.open not in os.supports_dir_fd:  # a root itself, or a platform without openat
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts[:-1]:
            inner = os.open(part, dir_flags, dir_fd=folder)
            os.close(folder)
            folder = inner
        return os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=folder)
    finally:
        os.close(folder)


class PathError(ValueError):
    """A client-supplied path is not acceptable; the message says why and what is allowed."""


@dataclass(frozen=True)
class WalkItem:
    """One result of a walk: an image file (skip_reason None) or something skipped, with why."""

    path: Path
    skip_reason: str | None = None
    detail: str = ""
    # The walk's own stat of an image file, so that an unchanged file costs one stat in all.
    stat: os.stat_result | None = None


class PathPolicy:
    def __init__(self, roots: Sequence[str | Path]) -> None:
        resolved: list[Path] = []
        for raw in roots:
            expanded = os.path.expanduser(os.fspath(raw))
            try:
                real = Path(os.path.realpath(expanded, strict=True))
            except OSError as exc:
                raise PathError(f"allowed folder {os.fspath(raw)!r} does not exist ({exc.strerror})") from None
            if not real.is_dir():
                raise PathError(f"allowed folder {os.fspath(raw)!r} is not a directory")
            if real not in resolved:
                resolved.append(real)
        self.roots: tuple[Path, ...] = tuple(resolved)

    def _allowed_list(self) -> str:
        return ", ".join(str(r) for r in self.roots) or "(none)"

    def require_roots(self) -> None:
        if not self.roots:
            raise PathError(
                "no folders are allowed yet; start the server with --allow DIR (repeatable) or set "
                f"the environment variable {ALLOW_ENV} to folders separated by {os.pathsep!r}"
            )

    def contains(self, path: Path) -> bool:
        # is_relative_to compares whole components, so /photos2 is not inside /photos
        # (a plain str.startswith would say it is). realpath so symlinks cannot escape.
        real = Path(os.path.realpath(path))
        return any(real == root or real.is_relative_to(root) for root in self.roots)

    def resolve(self, raw: str, *, want: Literal["file", "dir", "any"] = "any") -> Path:
        self.require_roots()
        if not isinstance(raw, str) or raw.strip() == "":
            # Named: among several image paths, the caller must see which one was blank.
            raise PathError(f"path {raw!r} is empty; give a file or folder inside: " + self._allowed_list())
        if "\x00" in raw:
            raise PathError(f"path {raw!r} contains a NUL byte, which no real path can")
        if len(raw) > MAX_PATH_CHARS:
            raise PathError(f"path is {len(raw)} characters long; at most {MAX_PATH_CHARS} are accepted")
        # '..' is rejected outright rather than normalised: it is never needed to name a
        # file inside an allowed folder, and refusing it keeps the policy easy to reason about.
        if ".." in PurePath(raw).parts or ".." in raw.replace("\\", "/").split("/"):
            raise PathError(f"path {raw!r} contains a '..' component; use an absolute path inside an allowed folder")
        candidate = Path(os.path.expanduser(raw))
        if not candidate.is_absolute():
            if len(self.roots) != 1:
                raise PathError(
                    f"relative path {raw!r} is ambiguous with {len(self.roots)} allowed folders; "
                    f"give an absolute path inside one of: {self._allowed_list()}"
                )
            candidate = self.roots[0] / candidate
        try:
            real = Path(os.path.realpath(candidate, strict=True))
        except FileNotFoundError:
            raise PathError(f"path {raw!r} does not exist") from None
        except OSError as exc:  # symlink loop, permission denied on a parent, ...
            raise PathError(f"path {raw!r} cannot be resolved: {exc.strerror or exc}") from None
        if not self.contains(real):
            raise PathError(
                # The link's target is not named: it lies outside what the client may see.
                f"path {raw!r} leads outside the allowed folders: " + self._allowed_list()
            )
        if want == "file" and not real.is_file():
            raise PathError(f"path {raw!r} is not a regular file")
        if want == "dir" and not real.is_dir():
            raise PathError(f"path {raw!r} is not a folder")
        return real

    def walk(
        self,
        top: Path,
        *,
        recursive: bool = True,
        extensions: Collection[str],
        max_files: int | None = None,
    ) -> Iterator[WalkItem]:
        """Yield image files under ``top`` in a deterministic (name-sorted, depth-first) order.

        Problems are yielded as WalkItems with a skip_reason, never raised, so one bad
        folder cannot abort an indexing run. ``top`` must be a folder inside the roots.
        """
        exts = frozenset(e.lower() for e in extensions)
        top_real = Path(os.path.realpath(top))
        if not self.contains(top_real):
            raise PathError(f"folder {str(top)!r} is outside the allowed folders: {self._allowed_list()}")
        if not top_real.is_dir():
            raise PathError(f"{str(top)!r} is not a folder")

        seen_dirs: set[tuple[int, int]] = set()
        # Files are keyed by real path, not inode: two hard links are two names a user may
        # search under, while a symlink and its target share one real path.
        seen_files: set[Path] = set()
        count = 0
        top_st = top_real.stat()
        seen_dirs.add((top_st.st_dev, top_st.st_ino))

        # Explicit stack of per-directory iterators: depth-first without recursion
        # (no RecursionError on deep trees) and without materialising the whole tree.
        stack: list[Iterator[os.DirEntry[str]]] = []
        first = _list_dir(top_real)
        if isinstance(first, WalkItem):
            yield first
            return
        stack.append(iter(first))

        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            if entry.name.startswith("."):
                continue  # hidden files and folders (.git, .thumbnails, ...) are skipped silently
            link = Path(entry.path)
            try:
                is_link = entry.is_symlink()
                if is_link:
                    target = self._follow_link(link, exts)
                    if isinstance(target, WalkItem):
                        yield target
                        continue
                    if target is None:
                        continue
                    path = target
                    st = os.stat(path)
                else:
                    path = link
                    st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                yield WalkItem(link, SKIP_UNREADABLE, exc.strerror or str(exc))
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                # The visited set ends loops like `loop -> ..` or `a -> b -> a`, and
                # stops the same folder being scanned twice through two links.
                if not recursive or key in seen_dirs:
                    continue
                seen_dirs.add(key)
                listing = _list_dir(path)
                if isinstance(listing, WalkItem):
                    yield listing
                else:
                    stack.append(iter(listing))
            elif stat.S_ISREG(st.st_mode):
                if path.suffix.lower() not in exts or path in seen_files:
                    continue
                if max_files is not None and count >= max_files:
                    # Only reported when a further file exists, so the caller knows the
                    # result was actually cut short.
                    yield WalkItem(top_real, SKIP_MAX_FILES, f"stopped after {max_files} files")
                    return
                seen_files.add(path)
                count += 1
                yield WalkItem(path, stat=st)
            elif path.suffix.lower() in exts:
                # Reported, never opened: opening a FIFO blocks, and a device can be endless.
                yield WalkItem(link, SKIP_NOT_A_FILE, f"a {_file_type(st.st_mode)}, not a regular file")

    def _follow_link(self, link: Path, exts: frozenset[str]) -> Path | WalkItem | None:
        """Resolve a symlink found while walking; a WalkItem means 'report and skip', None 'ignore'."""
        try:
            target = Path(os.path.realpath(link, strict=True))
        except OSError:
            # Report broken links that could have been an image or a folder; a broken
            # 'notes.txt' link is as uninteresting as a 'notes.txt' file.
            if link.suffix == "" or link.suffix.lower() in exts:
                return WalkItem(link, SKIP_BROKEN, "symlink target does not exist")
            return None
        if not self.contains(target):
            relevant = target.is_dir() or link.suffix.lower() in exts or target.suffix.lower() in exts
            if relevant:
                # The target is not named in the detail: it lies outside what the client may see.
                return WalkItem(link, SKIP_OUTSIDE, "symlink points outside the allowed folders")
            return None
        return target


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device")):
        if test(mode):
            return name
    return "block device" if stat.S_ISBLK(mode) else "special file"


def _list_dir(path: Path) -> list[os.DirEntry[str]] | WalkItem:
    """Sorted entries of one folder, or an 'unreadable_dir' item instead of raising."""
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as exc:
        return WalkItem(path, SKIP_UNREADABLE_DIR, exc.strerror or str(exc))
    entries.sort(key=lambda e: e.name)
    return entries

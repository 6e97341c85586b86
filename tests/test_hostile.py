"""A hostile folder, indexed for real: every file is indexed correctly or skipped with its
reason, the rest of the folder still gets indexed, nothing outside the allowed folder is
opened (audited with sys.addaudithook), no program is started, and text from file names
comes back only as capped data fields."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from cliplens.server.encoder import load_encoder
from cliplens.server.paths import MAX_SHOWN_PATH, PathPolicy, shown
from cliplens.server.store import ImageStore, open_client
from cliplens.tools.index_folder import MAX_TEXT, IndexFolderInput, index_folder

from . import hostile_corpus
from .conftest import connect, make_image, structured
from .hostile_corpus import INDEXED, INJECTION, SILENT, Entry
from .test_stdio_e2e import TIMEOUT, isolated_env

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# --- auditing ------------------------------------------------------------------------------

_AUDIT: list[tuple[str, Any, Any]] | None = None  # None: not recording
_SPAWN_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork"}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _AUDIT is None:
        return
    if event == "open" and isinstance(args[0], str | bytes):
        _AUDIT.append(("open", args[0], args[2]))
    elif event in _SPAWN_EVENTS:
        _AUDIT.append((event, args[0] if args else None, None))


sys.addaudithook(_audit)  # hooks cannot be removed: this one records only inside `audited()`


class audited:
    def __enter__(self) -> list[tuple[str, Any, Any]]:
        global _AUDIT
        _AUDIT = []
        return _AUDIT

    def __exit__(self, *exc: object) -> None:
        global _AUDIT
        _AUDIT = None


def opened_target(path: str | bytes, flags: int | None) -> Path:
    """What an open really reached: with O_NOFOLLOW a final symlink is refused, not followed."""
    text = os.fsdecode(path)
    if flags is not None and flags & getattr(os, "O_NOFOLLOW", 0):
        return Path(os.path.realpath(os.path.dirname(text))) / os.path.basename(text)
    return Path(os.path.realpath(text))


def assert_confined(events: list[tuple[str, Any, Any]], root: Path, outside: Path) -> int:
    """No open reached `outside` or left `root` through a link; no program was started.
    Returns how many opens were inside `root`, so a test can show the audit saw the reads.

    Image files are opened relative to a folder descriptor (openat), one component at a time
    from the root, and the audit event then carries only the component's name: such an open
    must refuse symlinks (O_NOFOLLOW), which is what keeps it beneath the root."""
    root, outside = root.resolve(), outside.resolve()
    names = {os.fsdecode(n) for _, dirs, files in os.walk(root) for n in [*dirs, *files]}
    inside = 0
    for event, path, flags in events:
        assert event == "open", f"a program was started: {event} {path!r}"
        if not os.path.isabs(os.fsdecode(path)):
            if os.fsdecode(path) not in names:
                continue  # the import system's own relative opens
            assert flags is not None and flags & os.O_NOFOLLOW, f"relative open of {path!r} may follow a link"
            inside += 1
            continue
        target = opened_target(path, flags)
        assert not target.is_relative_to(outside), f"opened {target} outside the allowed folder"
        given = Path(os.path.abspath(os.fsdecode(path)))
        if given.is_relative_to(root):
            assert target.is_relative_to(root), f"{given} led outside the allowed folder, to {target}"
            inside += 1
    return inside


# --- the corpus ----------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path: Path) -> Iterator[tuple[Path, Path, list[Entry]]]:
    root, outside = tmp_path / "hostile", tmp_path / "outside"
    entries = hostile_corpus.build(root, outside)
    yield root, outside, entries
    hostile_corpus.restore_permissions(root)


def expected_outcomes(root: Path, entries: list[Entry], *, privileged: bool) -> tuple[set[str], dict[str, str]]:
    """(paths that must be indexed, shown path -> skip reason) for this corpus."""
    real = root.resolve()
    indexed: set[str] = set()
    skipped: dict[str, str] = {}
    for entry in entries:
        expect = entry.expect
        if entry.needs_non_root and privileged:
            # Root reads through mode 000: the file (or the folder's file) is simply indexed.
            indexed.add(str(real / (entry.relpath if expect != "unreadable_dir" else "locked_dir/hidden_inside.png")))
            continue
        if expect == INDEXED:
            indexed.add(str(real / entry.relpath))
        elif expect != SILENT:
            skipped[shown(str(real / entry.relpath), MAX_TEXT)] = expect
    return indexed, skipped


def strings_by_key(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from strings_by_key(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from strings_by_key(v, key)
    elif isinstance(value, str):
        yield key, value


def assert_names_are_only_data(*outputs: dict[str, Any]) -> None:
    for output in outputs:
        for key, text in strings_by_key(output):
            if INJECTION in text:
                assert key in ("path", "folder"), f"file-name text surfaced in {key!r}: {text[:80]!r}"
            assert len(text) <= max(MAX_SHOWN_PATH, 4000), f"{key!r} is {len(text)} characters"


async def test_a_hostile_folder_is_indexed_file_by_file_and_nothing_outside_is_opened(
    corpus: tuple[Path, Path, list[Entry]], tiny_clip: Path, tmp_path: Path
) -> None:
    root, outside, entries = corpus
    from cliplens.server.config import Settings

    settings = Settings(model=str(tiny_clip), device="cpu", precision="fp32", db_dir=tmp_path / "db", allow=[root])
    want_indexed, want_skipped = expected_outcomes(root, entries, privileged=IS_ROOT)
    async with connect(settings) as client:
        with audited() as events:
            first = structured(await client.call_tool("index_folder", {"path": str(root)}))
            search = structured(
                await client.call_tool("search_images", {"query": "a photo", "top_k": 100, "cutoff": "none"})
            )
        again = structured(await client.call_tool("index_folder", {"path": str(root)}))
        # The server is still whole: a plain folder indexes and searches after all that.
        plain = make_image(root / "after" / "late.png", "blue")
        late = structured(await client.call_tool("index_folder", {"path": str(plain.parent)}))

    got_skipped = {s["path"]: s["reason"] for s in first["skipped"]}
    assert got_skipped == want_skipped
    assert first["skipped_count"] == len(want_skipped)
    got_indexed = {h["path"] for h in search["hits"]}
    assert got_indexed == want_indexed
    assert first["added"] == len(want_indexed)
    # Everything the walk found was either embedded or skipped by the decoder, with its reason.
    walk_reasons = {"outside_allowed", "broken_symlink", "not_a_file", "unreadable_dir", "bad_name"}
    assert first["scanned"] == first["added"] + sum(r not in walk_reasons for r in want_skipped.values())
    assert len(search["hits"]) == len(got_indexed)  # each image once
    # Idempotent: nothing is embedded again, nothing new is skipped or removed.
    assert (again["unchanged"], again["added"], again["updated"], again["removed"]) == (len(want_indexed), 0, 0, 0)
    assert {s["path"]: s["reason"] for s in again["skipped"]} == want_skipped
    assert late["added"] == 1
    assert_names_are_only_data(first, search, again)
    # The audit saw our reads (so it was listening) and nothing outside.
    assert assert_confined(events, root, outside) >= len(want_indexed)


def test_the_corpus_covers_every_kind_the_issue_names(corpus: tuple[Path, Path, list[Entry]]) -> None:
    _, _, entries = corpus
    kinds = " | ".join(e.kind for e in entries)
    for needed in (
        "png bomb",
        "2nd frame is a bomb",
        "cut off mid-stream",
        "0-byte",
        "random bytes",
        "eps named .jpg",
        "tiff named .png",
        "symlink loop",
        "symlink to a file outside",
        "unreadable file",
        "unreadable folder",
        "prompt-injection",
        "cmyk",
        "16-bit",
        "palette png with transparency",
        "animated",
        "exif-rotated",
    ):
        assert needed in kinds
    assert len(entries) >= 45


# --- files that change while they are being indexed ----------------------------------------


def test_files_replaced_during_indexing_are_never_followed_and_the_next_run_converges(
    tiny_clip: Path, tmp_path: Path
) -> None:
    root, outside = tmp_path / "photos", tmp_path / "outside"
    make_image(outside / "secret.png", "yellow")
    names = [f"img{i:02d}.png" for i in range(24)]
    for i, name in enumerate(names):
        make_image(root / name, (10 * i, 200 - 5 * i, 90))
    encoder = load_encoder(str(tiny_clip), "cpu", "fp32")
    store = ImageStore(open_client(tmp_path / "db", None), encoder.info, location="test")
    policy = PathPolicy([root])
    swapped, linked, vanished, rewritten = root / names[20], root / names[21], root / names[22], root / names[1]
    # A folder whose files will be read after it has been swapped for a link to a folder outside
    # that holds files of the same names: the check-then-open race of CVE-2025-53109's kind.
    for i in range(3):
        make_image(root / "sub" / f"s{i}.png", (90, 10 * i, 200))
        make_image(outside / "decoy" / f"s{i}.png", "yellow")
    replaced: list[str] = []

    def progress(done: int, total: int, message: str) -> None:
        # Called after the walk listed every file and again after each batch: the first call
        # changes files the pipeline has yet to read, a later one a file it has already read.
        if not replaced:
            make_image(tmp_path / "new.png", "green").replace(swapped)  # atomic swap of the bytes
            linked.unlink()
            linked.symlink_to(outside / "secret.png")  # swapped for a link leading outside
            vanished.unlink()
            (root / "sub").rename(root / "sub_moved")
            (root / "sub").symlink_to(outside / "decoy")
            replaced.append("before read")
        elif len(replaced) == 1 and done >= 8:
            make_image(rewritten, "blue")  # already embedded in the first batch: now stale
            replaced.append("after read")

    with audited() as events:
        first = index_folder(encoder, store, policy, IndexFolderInput(path=str(root)), progress=progress, batch_size=4)
    assert replaced == ["before read", "after read"]
    assert_confined(events, root, outside)
    reasons = {s.path: s.reason for s in first.skipped or []}
    real = root.resolve()
    lost = [real / linked.name, real / vanished.name, *(real / "sub" / f"s{i}.png" for i in range(3))]
    assert reasons == {str(p): "unreadable" for p in lost}
    decoys = {hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest() for p in (outside / "decoy").iterdir()}
    assert not decoys & {s.content_hash for s in store.entries_under(real).values()}

    second = index_folder(encoder, store, policy, IndexFolderInput(path=str(root)))
    assert second.updated == 1  # the file rewritten after it was read
    stored = store.entries_under(root.resolve())
    on_disk = {str(p.resolve()) for p in root.rglob("*.png") if not p.is_symlink() and not p.parent.is_symlink()}
    assert set(stored) == on_disk
    for path, image in stored.items():
        assert image.content_hash == hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest(), path
    assert {s.path: s.reason for s in second.skipped or []} == {
        str(real / linked.name): "outside_allowed",
        str(real / "sub"): "outside_allowed",
    }


# --- the same corpus over stdio, without the power to read past file permissions -----------

# Runs in the server process: records opens and program starts to a log, then runs the CLI in
# the same interpreter.
_WRAPPER = r"""
import os, sys
log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
SPAWN = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork"}
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        os.write(log, (ascii((event, args[0], args[2])) + "\n").encode())
    elif event in SPAWN:
        os.write(log, (ascii((event, str(args[0]) if args else None, None)) + "\n").encode())
sys.addaudithook(hook)
from cliplens.server.cli import main
sys.exit(main(sys.argv[2:]))
"""


def unprivileged(command: list[str]) -> tuple[list[str], bool]:
    """`command` made to respect file permissions, and whether it does. Root ignores mode 000
    through two capabilities; setpriv drops them from the bounding set, so the process stays
    root (and can still read the interpreter under /root) but mode 000 means no access."""
    if not IS_ROOT:
        return command, True
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return command, False
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command], True


@pytest.mark.slow
async def test_the_hostile_folder_over_stdio_where_permissions_hold(
    corpus: tuple[Path, Path, list[Entry]], tiny_clip: Path, tmp_path: Path
) -> None:
    root, outside, entries = corpus
    log = tmp_path / "audit.log"
    args = [str(log), "serve", "--model", str(tiny_clip), "--db", str(tmp_path / "db"), "--allow", str(root)]
    command, permissions_hold = unprivileged([sys.executable, "-c", _WRAPPER, *args])
    params = StdioServerParameters(command=command[0], args=command[1:], env=isolated_env(tmp_path))
    want_indexed, want_skipped = expected_outcomes(root, entries, privileged=not permissions_hold)
    errors = tmp_path / "stderr.txt"
    try:
        with errors.open("w") as errlog, anyio.fail_after(TIMEOUT * 2):
            async with Client(stdio_client(params, errlog=errlog)) as client:
                first = structured(await client.call_tool("index_folder", {"path": str(root)}))
                search = structured(
                    await client.call_tool("search_images", {"query": "a photo", "top_k": 100, "cutoff": "none"})
                )
    except Exception:
        print(errors.read_text()[-3000:], file=sys.stderr)
        raise
    assert {s["path"]: s["reason"] for s in first["skipped"]} == want_skipped
    if permissions_hold:
        assert {"unreadable", "unreadable_dir"} <= set(want_skipped.values())
    assert {h["path"] for h in search["hits"]} == want_indexed
    assert_names_are_only_data(first, search)
    events = [ast.literal_eval(line) for line in log.read_text().splitlines()]
    assert assert_confined(events, root, outside) >= len(want_indexed)

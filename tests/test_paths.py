from __future__ import annotations

import os
from pathlib import Path

import pytest

from cliplens.server.paths import PathError, PathPolicy, WalkItem, open_beneath, shown

EXTS = {".jpg", ".png"}


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """/t/photos (allowed), its sibling /t/photos2 (not allowed) and /outside."""
    photos = tmp_path / "t" / "photos"
    photos2 = tmp_path / "t" / "photos2"
    outside = tmp_path / "outside"
    for d in (photos, photos2, outside):
        d.mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"x")
    (photos2 / "x.jpg").write_bytes(b"x")
    (outside / "secret.jpg").write_bytes(b"x")
    return {"photos": photos, "photos2": photos2, "outside": outside}


def files(items: list[WalkItem]) -> list[Path]:
    return [i.path for i in items if i.skip_reason is None]


def skips(items: list[WalkItem]) -> dict[str, str]:
    return {i.path.name: i.skip_reason for i in items if i.skip_reason is not None}


# --- construction -----------------------------------------------------------


def test_roots_are_resolved(tree: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tree["photos"])
    policy = PathPolicy([link, str(tree["photos"])])
    assert policy.roots == (tree["photos"].resolve(),)


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(PathError, match="nope"):
        PathPolicy([tmp_path / "nope"])


def test_file_root_rejected(tree: dict[str, Path]) -> None:
    with pytest.raises(PathError, match="not a directory"):
        PathPolicy([tree["photos"] / "a.jpg"])


def test_no_roots_message_explains_how_to_allow() -> None:
    policy = PathPolicy([])
    with pytest.raises(PathError) as exc:
        policy.resolve("/tmp")
    assert "--allow" in str(exc.value)
    assert "CLIPLENS_ALLOW" in str(exc.value)


# --- resolve ----------------------------------------------------------------


def test_resolve_inside(tree: dict[str, Path]) -> None:
    policy = PathPolicy([tree["photos"]])
    assert policy.resolve(str(tree["photos"] / "a.jpg"), want="file") == (tree["photos"] / "a.jpg").resolve()
    assert policy.resolve(str(tree["photos"]), want="dir") == tree["photos"].resolve()


def test_sibling_prefix_is_not_inside(tree: dict[str, Path]) -> None:
    policy = PathPolicy([tree["photos"]])
    target = tree["photos2"] / "x.jpg"
    assert not policy.contains(target)
    with pytest.raises(PathError) as exc:
        policy.resolve(str(target))
    msg = str(exc.value)
    assert "outside the allowed folders" in msg
    assert str(tree["photos"].resolve()) in msg  # lists what is allowed


def test_dotdot_rejected(tree: dict[str, Path]) -> None:
    policy = PathPolicy([tree["photos"]])
    with pytest.raises(PathError, match=r"'\.\.'"):
        policy.resolve("../photos2/x.jpg")
    with pytest.raises(PathError, match=r"'\.\.'"):
        policy.resolve(str(tree["photos"]) + "/../photos2/x.jpg")


def test_symlink_escape_rejected(tree: dict[str, Path]) -> None:
    (tree["photos"] / "evil.jpg").symlink_to(tree["outside"] / "secret.jpg")
    (tree["photos"] / "etc").symlink_to("/etc")
    policy = PathPolicy([tree["photos"]])
    with pytest.raises(PathError, match="outside"):
        policy.resolve(str(tree["photos"] / "evil.jpg"))
    with pytest.raises(PathError, match="outside"):
        policy.resolve("etc/passwd" if Path("/etc/passwd").exists() else "etc")


def test_symlink_inside_is_followed(tree: dict[str, Path]) -> None:
    (tree["photos"] / "alias.jpg").symlink_to(tree["photos"] / "a.jpg")
    policy = PathPolicy([tree["photos"]])
    assert policy.resolve("alias.jpg") == (tree["photos"] / "a.jpg").resolve()


@pytest.mark.parametrize("raw", ["", "   ", "a\x00b", "x" * 5000])
def test_bad_strings_rejected(tree: dict[str, Path], raw: str) -> None:
    with pytest.raises(PathError):
        PathPolicy([tree["photos"]]).resolve(raw)


def test_relative_with_one_root(tree: dict[str, Path]) -> None:
    policy = PathPolicy([tree["photos"]])
    assert policy.resolve("a.jpg") == (tree["photos"] / "a.jpg").resolve()


def test_relative_with_two_roots_needs_absolute(tree: dict[str, Path]) -> None:
    policy = PathPolicy([tree["photos"], tree["photos2"]])
    with pytest.raises(PathError, match="absolute"):
        policy.resolve("a.jpg")


def test_missing_path(tree: dict[str, Path]) -> None:
    with pytest.raises(PathError, match="does not exist"):
        PathPolicy([tree["photos"]]).resolve("nope.jpg")


def test_want_file_and_dir(tree: dict[str, Path]) -> None:
    policy = PathPolicy([tree["photos"]])
    with pytest.raises(PathError, match="not a regular file"):
        policy.resolve(str(tree["photos"]), want="file")
    with pytest.raises(PathError, match="not a folder"):
        policy.resolve("a.jpg", want="dir")


def test_tilde_expanded(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tree["photos"]))
    assert PathPolicy(["~"]).resolve("~/a.jpg") == (tree["photos"] / "a.jpg").resolve()


# --- walk -------------------------------------------------------------------


def make_files(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rel.encode())


def test_walk_sorted_filtered_hidden(tree: dict[str, Path]) -> None:
    root = tree["photos"]
    make_files(root, "b.PNG", "c.txt", "sub/d.jpg", ".hidden.jpg", ".git/e.jpg", "sub/.f.png")
    items = list(PathPolicy([root]).walk(root, extensions=EXTS))
    assert [p.relative_to(root.resolve()).as_posix() for p in files(items)] == ["a.jpg", "b.PNG", "sub/d.jpg"]
    assert skips(items) == {}


def test_walk_non_recursive(tree: dict[str, Path]) -> None:
    root = tree["photos"]
    make_files(root, "sub/d.jpg", "z.png")
    items = list(PathPolicy([root]).walk(root, recursive=False, extensions=EXTS))
    assert [p.name for p in files(items)] == ["a.jpg", "z.png"]


def test_walk_loops_end_and_dedupe(tree: dict[str, Path]) -> None:
    root = tree["photos"]
    make_files(root, "a/x.jpg", "b/y.jpg")
    (root / "loop").symlink_to("..")  # points at t/, which is outside the root
    (root / "self").symlink_to(".")  # points at the root itself
    (root / "a" / "to_b").symlink_to(root / "b")
    (root / "b" / "to_a").symlink_to(root / "a")
    (root / "dup.jpg").symlink_to(root / "a.jpg")
    items = list(PathPolicy([root]).walk(root, extensions=EXTS))
    got = [p.relative_to(root.resolve()).as_posix() for p in files(items)]
    assert sorted(got) == ["a.jpg", "a/x.jpg", "b/y.jpg"]
    assert len(got) == len(set(got))
    assert skips(items) == {"loop": "outside_allowed"}


def test_walk_loop_inside_root_when_parent_allowed(tree: dict[str, Path]) -> None:
    parent = tree["photos"].parent
    (tree["photos"] / "loop").symlink_to("..")
    items = list(PathPolicy([parent]).walk(parent, extensions=EXTS))
    assert sorted(p.name for p in files(items)) == ["a.jpg", "x.jpg"]


def test_walk_reports_outside_and_broken(tree: dict[str, Path]) -> None:
    root = tree["photos"]
    (root / "evil.jpg").symlink_to(tree["outside"] / "secret.jpg")
    (root / "evildir").symlink_to(tree["outside"])
    (root / "gone.jpg").symlink_to(root / "missing.jpg")
    (root / "notes.txt").symlink_to(tree["outside"] / "nothing.txt")  # non-image: silent
    items = list(PathPolicy([root]).walk(root, extensions=EXTS))
    assert [p.name for p in files(items)] == ["a.jpg"]
    assert skips(items) == {
        "evil.jpg": "outside_allowed",
        "evildir": "outside_allowed",
        "gone.jpg": "broken_symlink",
    }
    # Details must not leak where the outside link points.
    assert all(str(tree["outside"]) not in i.detail for i in items)


def test_walk_unreadable_dir(tree: dict[str, Path]) -> None:
    root = tree["photos"]
    make_files(root, "locked/x.jpg", "open/y.jpg")
    locked = root / "locked"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK | os.X_OK):
            pytest.skip("running with privileges that ignore permissions (root)")
        items = list(PathPolicy([root]).walk(root, extensions=EXTS))
    finally:
        locked.chmod(0o755)
    assert [p.name for p in files(items)] == ["a.jpg", "y.jpg"]
    assert skips(items) == {"locked": "unreadable_dir"}


def test_walk_max_files(tree: dict[str, Path]) -> None:
    root = tree["photos"]
    make_files(root, "b.jpg", "c.jpg", "d.jpg")
    policy = PathPolicy([root])
    items = list(policy.walk(root, extensions=EXTS, max_files=2))
    assert [p.name for p in files(items)] == ["a.jpg", "b.jpg"]
    assert items[-1] == WalkItem(root.resolve(), "max_files_reached", items[-1].detail)
    # Exactly at the cap: nothing was cut, so no marker.
    items = list(policy.walk(root, extensions=EXTS, max_files=4))
    assert len(files(items)) == 4 and skips(items) == {}


def test_walk_is_lazy(tree: dict[str, Path]) -> None:
    root = tree["photos"]
    make_files(root, *(f"d{i}/f.jpg" for i in range(50)))
    it = PathPolicy([root]).walk(root, extensions=EXTS)
    assert next(it).path.name == "a.jpg"


def test_walk_top_outside_raises(tree: dict[str, Path]) -> None:
    with pytest.raises(PathError):
        list(PathPolicy([tree["photos"]]).walk(tree["photos2"], extensions=EXTS))


def test_walk_unreadable_dir_simulated(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Same as above but works as root: scandir itself fails for one folder."""
    root = tree["photos"]
    make_files(root, "locked/x.jpg", "open/y.jpg")
    real_scandir = os.scandir

    def fake_scandir(path):  # type: ignore[no-untyped-def]
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    items = list(PathPolicy([root]).walk(root, extensions=EXTS))
    assert [p.name for p in files(items)] == ["a.jpg", "y.jpg"]
    assert skips(items) == {"locked": "unreadable_dir"}
    assert next(i for i in items if i.skip_reason).detail == "Permission denied"


# --- opening beneath a root and showing names ---------------------------------


def test_open_beneath_refuses_a_folder_swapped_for_a_link(tree: dict[str, Path]) -> None:
    root = tree["photos"].resolve()
    (root / "sub").mkdir()
    (root / "sub" / "x.jpg").write_bytes(b"inside")
    fd = open_beneath([root], root / "sub" / "x.jpg", os.O_RDONLY)
    with os.fdopen(fd, "rb") as fh:
        assert fh.read() == b"inside"
    (tree["outside"] / "x.jpg").write_bytes(b"secret")
    (root / "sub").rename(root / "moved")
    (root / "sub").symlink_to(tree["outside"])  # the checked path now leads outside
    with pytest.raises(OSError):
        open_beneath([root], root / "sub" / "x.jpg", os.O_RDONLY)
    (root / "file_link.jpg").symlink_to(tree["outside"] / "x.jpg")
    with pytest.raises(OSError):
        open_beneath([root], root / "file_link.jpg", os.O_RDONLY)
    with pytest.raises(PermissionError):
        open_beneath([root], tree["outside"] / "x.jpg", os.O_RDONLY)


def test_walk_reports_fifos_and_sockets_under_image_names(tree: dict[str, Path]) -> None:
    import socket

    root = tree["photos"]
    os.mkfifo(root / "pipe.jpg")
    os.mkfifo(root / "pipe.txt")  # not an image name: not worth a report
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock.png"))
    items = list(PathPolicy([root]).walk(root, extensions=EXTS))
    assert skips(items) == {"pipe.jpg": "not_a_file", "sock.png": "not_a_file"}
    assert {i.detail for i in items if i.skip_reason} == {"a FIFO, not a regular file", "a socket, not a regular file"}


def test_hard_links_are_two_names_and_a_symlink_is_one(tree: dict[str, Path]) -> None:
    root = tree["photos"]
    os.link(root / "a.jpg", root / "b.jpg")
    (root / "c.jpg").symlink_to(root / "a.jpg")
    got = sorted(p.name for p in files(list(PathPolicy([root]).walk(root, extensions=EXTS))))
    assert got == ["a.jpg", "b.jpg"]


def test_shown_escapes_undecodable_bytes_and_caps_length() -> None:
    latin1 = os.fsdecode(b"/photos/caf\xe9.png")
    assert shown(latin1, 100) == "/photos/caf\\xe9.png"
    assert shown("\ud800x", 100) == "\\ud800x"  # a surrogate that stands for no byte
    assert shown("é" * 10, 5) == "éééé…"
    assert shown("fine.png", 100) == "fine.png"

"""One writer per embedded store folder.

Chroma's embedded store is not process-safe: two clients (say Claude Desktop and an IDE)
each starting cliplens on the same folder could corrupt its vector index. The first
process takes an exclusive advisory lock; later ones open the store read-only.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no fcntl
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "cliplens.lock"


class StoreLock:
    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Try to take the lock without waiting; True when this process now owns the folder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            from .store import StoreError  # store imports this module

            raise StoreError(
                f"cannot open the store folder {self.path.parent}: {exc.strerror or exc}; "
                "pass --db with a folder this user can write"
            ) from exc
        if fcntl is None:  # pragma: no cover
            self._fd = fd
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return "another process"
        return f"pid {pid}" if pid else "another process"

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

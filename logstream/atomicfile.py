"""Writing a file so that readers see the old content or the new, never half of it (a kill mid-write).

The new content goes to a hidden temporary file beside the target (same file system, named by the
process id so concurrent writers do not clobber each other's halves) and is renamed over it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path`, on an exception it is removed.

    Creates the parent directory. Raises OSError when the directory is not writable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (see the module docstring)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)

"""Atomic file writes: a file is either its previous version or its complete new one, never a torn mix.

The content goes to a temporary name beside the target, is flushed to disk, and is renamed over the target; an
exception (a full disk, a kill of the writer's logic) removes the temporary and leaves the target untouched.
"""
import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path to write; on success it is fsynced and renamed to `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Yield an open file whose content replaces `path` atomically when the block completes."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_json_atomic(path: str, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)

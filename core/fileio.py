"""Atomic file writes: a file is either its previous version or its complete new one, never a torn mix.

The content goes to a temporary name beside the target, is flushed to disk, and is renamed over the target; an
exception (a full disk, a failing serialiser) removes the temporary and leaves the target untouched. A kill -9
can leave a `<name>.tmp<pid>` file beside the target, never a torn target; readers ignore such names.
"""
import contextlib
import json
import os


class WriteError(OSError):
    """A write that failed and left the previous version of its target (if any) in place."""


def _failed(path: str, err: OSError) -> WriteError:
    if isinstance(err, WriteError):  # already names its file (nested atomic writes)
        return err
    reason = err.strerror or str(err)
    return WriteError(err.errno, f"could not write {path} ({reason}); the previous version, if any, is intact")


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path to write; on success it is fsynced and renamed to `path`.

    An OSError (a full disk, a read-only directory) becomes a WriteError naming `path`; any exception removes the
    temporary file and leaves `path` as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would make it: some writers (safetensors) create files 0600
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        raise _failed(path, err) from err
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


def append_line(path: str, line: str) -> None:
    """Append `line` + newline to a log file (e.g. metrics.jsonl) as a whole or not at all: a failed write is
    truncated back, so the earlier lines stay intact and the file still ends with a complete line."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
    except BaseException as err:
        if os.path.exists(path):
            os.truncate(path, size)
        if isinstance(err, OSError):
            raise _failed(path, err) from err
        raise

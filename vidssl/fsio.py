"""File writes that survive a crash: one home for every atomic write in vidssl.

Every file a user or a resumed run relies on (shard indexes, footage markers and labels, demo
state, reports, contact sheets, loader job files) is written the same way: to a temporary name in
the same folder, flushed and fsynced, renamed over the final name, and the folder fsynced so the
rename itself survives a power loss. A reader therefore sees the old file or the new one, never a
half-written one, and a crash leaves at most a temporary file behind (``*.tmp-PID``).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["fsync_dir", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "unlink_quiet",
           "TMP_MARK"]

#: Part of every temporary name (``NAME.tmp-PID``): clean-up code may remove files containing it.
TMP_MARK = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames in folder ``path`` durable (best effort where folders cannot be opened or synced)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary name and a rename, fsyncing the file and its folder.

    Readers never see a partial file; on any error the temporary file is removed and the previous
    content of ``path`` (if any) is untouched. ``durable=False`` skips the two fsyncs: only for
    hand-overs between live processes that nobody reads after a crash (the loader's job file), where
    an fsync can wait for the file system to flush every other dirty file first.
    """
    path = os.fspath(path)
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as JSON (UTF-8, a final newline)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=sort_keys) + "\n")


def unlink_quiet(path: str | os.PathLike) -> None:
    """Remove a file if it exists; errors (already gone, permissions) are ignored: for clean-up paths."""
    try:
        os.unlink(path)
    except OSError:
        pass

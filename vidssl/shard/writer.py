"""Atomic, byte-reproducible tar shards.

A shard is written to ``.NAME.partial`` in the same folder and renamed to ``NAME`` only after
it is complete and fsynced, so no file with a final shard name is ever partial. Members get
fixed metadata (mtime 0, uid/gid 0, no user/group names, mode 0644) and a fixed order
(json, mp4, cls), so the same samples give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import Any, BinaryIO

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive end to a whole record


class _HashingFile:
    """Write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.size


def fsync_dir(path: str) -> None:
    """Make a rename durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name and rename (readers never see a partial file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def member_bytes(size: int) -> int:
    """Bytes one member takes in the tar: header block + data padded to whole blocks."""
    return BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class ShardWriter:
    """One shard being written. ``add`` samples, then ``commit`` (rename) or ``abort``."""

    def __init__(self, folder: str, name: str) -> None:
        self.folder = folder
        self.name = name
        self.final = os.path.join(folder, name)
        self.tmp = os.path.join(folder, f".{name}.partial")
        self._fh = open(self.tmp, "wb")
        self._hf = _HashingFile(self._fh)
        self._tar = tarfile.open(fileobj=self._hf, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]
        # Copy member data in 1 MiB pieces (tarfile's default is 16 KiB: many small Python-level
        # write + sha256.update calls per clip). Same bytes either way.
        self._tar.copybufsize = 1 << 20
        self.samples = 0
        self.frames = 0
        self.seconds = 0.0

    @property
    def bytes(self) -> int:
        """Bytes written so far (members only, before the end-of-archive padding)."""
        return self._hf.size

    @staticmethod
    def sample_bytes(meta_json: bytes, mp4_size: int, cls: bytes | None) -> int:
        return member_bytes(len(meta_json)) + member_bytes(mp4_size) + (member_bytes(len(cls)) if cls else 0)

    def final_size_if_added(self, extra: int) -> int:
        """Size the shard would have on disk after adding ``extra`` member bytes and closing."""
        body = self.bytes + extra + 2 * BLOCK
        return (body + RECORD - 1) // RECORD * RECORD

    def add(self, key: str, meta_json: bytes, mp4_path: str, cls: bytes | None, frames: int, seconds: float) -> None:
        """Append one sample: KEY.json, KEY.mp4 (streamed from its temp file), KEY.cls."""
        self._tar.addfile(_tarinfo(f"{key}.json", len(meta_json)), io.BytesIO(meta_json))
        with open(mp4_path, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size  # the size of what is read, even if the path changed
            self._tar.addfile(_tarinfo(f"{key}.mp4", size), fh)
        if cls is not None:
            self._tar.addfile(_tarinfo(f"{key}.cls", len(cls)), io.BytesIO(cls))
        self.samples += 1
        self.frames += frames
        self.seconds += seconds

    def commit(self) -> dict[str, Any]:
        """Finish the archive, fsync, rename to the final name; returns the index record."""
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.final)
        fsync_dir(self.folder)
        return {"name": self.name, "samples": self.samples, "bytes": self._hf.size,
                "sha256": self._hf.sha.hexdigest(), "frames": self.frames, "seconds": round(self.seconds, 6)}

    def abort(self) -> None:
        try:
            self._fh.close()
        finally:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass

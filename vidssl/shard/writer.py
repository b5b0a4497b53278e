"""Atomic, byte-reproducible tar shards.

A shard is written to ``.NAME.partial`` in the same folder and renamed to ``NAME`` only after
it is complete and fsynced, so no file with a final shard name is ever partial. Members get
fixed metadata (mtime 0, uid/gid 0, no user/group names, mode 0644) and a fixed order
(json, mp4, cls), so the same samples give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import queue
import tarfile
import threading
from typing import Any, BinaryIO

from vidssl.fsio import fsync_dir


BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive end to a whole record


class _Sink:
    """Write-only sink for one shard: writes through the raw file descriptor, counts, and hashes
    (sha256) on a helper thread so the hash of one piece overlaps the copy of the next
    (hashlib releases the GIL on large buffers). File data is copied through a few reusable
    1 MiB buffers (no per-piece allocation); small pieces (headers, json) are batched into one
    write. The hash thread sees the pieces in exactly the order they were written."""

    CHUNK = 1 << 20

    def __init__(self, fh: BinaryIO) -> None:
        self.fd = fh.fileno()
        self.size = 0
        self._sha = hashlib.sha256()
        self._pending = bytearray()
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(3):
            self._free.put(bytearray(self.CHUNK))
        self._thread = threading.Thread(target=self._hash_loop, name="shard-sha256", daemon=True)
        self._thread.start()

    def _hash_loop(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            buf, n = item
            if n is None:  # an immutable piece (bytes)
                self._sha.update(buf)
            else:  # a reusable buffer: hand it back once hashed
                with memoryview(buf) as view:
                    self._sha.update(view[:n])
                self._free.put(buf)

    def _write_all(self, view) -> None:
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def write(self, data: bytes) -> None:
        """Append small bytes (written out before the next file copy or on flush)."""
        self._pending += data
        self.size += len(data)

    def flush(self) -> None:
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self._write_all(memoryview(data))
            self._todo.put((data, None))

    def copy_file(self, src: BinaryIO, size: int) -> None:
        """Append exactly ``size`` bytes read from ``src`` (OSError if it has fewer)."""
        self.flush()
        left = size
        while left > 0:
            buf = self._free.get()
            with memoryview(buf) as view:
                n = src.readinto(view[:min(left, self.CHUNK)])
                if not n:
                    self._free.put(buf)
                    raise OSError(f"unexpected end of data: {left} of {size} bytes missing")
                self._write_all(view[:n])
            self._todo.put((buf, n))
            left -= n
        self.size += size

    def hexdigest(self) -> str:
        """Flush, stop the hash thread and return the sha256 of everything written."""
        self.flush()
        self._todo.put(None)
        self._thread.join()
        return self._sha.hexdigest()

    def stop(self) -> None:
        self._todo.put(None)
        self._thread.join()


def member_bytes(size: int) -> int:
    """Bytes one member takes in the tar: header block + data padded to whole blocks."""
    return BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header ``tarfile`` writes for a regular file with our fixed metadata
    (mode 0644, uid/gid 0, no user/group names, mtime 0): the same bytes, built directly
    (tarfile's TarInfo/tobuf path costs ~0.1 ms a member). Names that do not fit the 100-byte
    name field, and sizes past USTAR's 8 GiB, go through tarfile itself."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11:
        return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    head = (raw.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" + b"0000000\0" + b"%011o\0" % size
            + b"00000000000\0")
    tail = b"0" + bytes(100) + b"ustar\x0000" + bytes(247)  # linkname, magic, names, dev numbers, prefix
    chksum = 256 + sum(head) + sum(tail)  # the checksum field counts as 8 spaces (8 * 32)
    return head + b"%06o\0 " % chksum + tail


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
        self._fh = open(self.tmp, "wb", buffering=0)
        self._sink = _Sink(self._fh)
        self.samples = 0
        self.frames = 0
        self.seconds = 0.0

    @property
    def bytes(self) -> int:
        """Bytes written so far (members only, before the end-of-archive padding)."""
        return self._sink.size

    @staticmethod
    def sample_bytes(meta_json: bytes, mp4_size: int, cls: bytes | None) -> int:
        return member_bytes(len(meta_json)) + member_bytes(mp4_size) + (member_bytes(len(cls)) if cls else 0)

    def final_size_if_added(self, extra: int) -> int:
        """Size the shard would have on disk after adding ``extra`` member bytes and closing."""
        body = self.bytes + extra + 2 * BLOCK
        return (body + RECORD - 1) // RECORD * RECORD

    def add(self, key: str, meta_json: bytes, mp4_path: str, cls: bytes | None, frames: int, seconds: float) -> None:
        """Append one sample: KEY.json, KEY.mp4 (streamed from its file), KEY.cls."""
        self._add_bytes(f"{key}.json", meta_json)
        with open(mp4_path, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size  # the size of what is read, even if the path changed
            self._sink.write(ustar_header(f"{key}.mp4", size))
            self._sink.copy_file(fh, size)
            self._sink.write(bytes(-size % BLOCK))
        if cls is not None:
            self._add_bytes(f"{key}.cls", cls)
        self.samples += 1
        self.frames += frames
        self.seconds += seconds

    def commit(self) -> dict[str, Any]:
        """Finish the archive, fsync, rename to the final name; returns the index record."""
        # End of archive as tarfile writes it: two zero blocks, then zeros up to a whole record.
        body = self._sink.size + 2 * BLOCK
        self._sink.write(bytes(2 * BLOCK + (-body % RECORD)))
        sha = self._sink.hexdigest()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.final)
        fsync_dir(self.folder)
        return {"name": self.name, "samples": self.samples, "bytes": self._sink.size,
                "sha256": sha, "frames": self.frames, "seconds": round(self.seconds, 6)}

    def _add_bytes(self, name: str, data: bytes) -> None:
        self._sink.write(ustar_header(name, len(data)))
        self._sink.write(data)
        self._sink.write(bytes(-len(data) % BLOCK))

    def abort(self) -> None:
        try:
            self._sink.stop()
            self._fh.close()
        finally:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass

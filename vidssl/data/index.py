"""Open a dataset's ``index.json`` and its shards: local paths, http(s):// (stdlib), any fsspec URL.

Shards are opened as forward-only byte streams; nothing is downloaded to disk. Network streams
carry a read timeout (a stalled server raises instead of hanging) and a length check (a server
that closes the connection early raises instead of looking like a short, valid tar).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import IO

from vidssl.errors import UserError

__all__ = ["DatasetIndex", "open_index", "open_stream", "is_remote", "ShardMissing"]


class ShardMissing(OSError):
    """The shard does not exist (local file absent, HTTP 404, fsspec FileNotFoundError)."""


def _scheme(location: str) -> str:
    parsed = urllib.parse.urlparse(location)
    # Windows drive letters ("C:\\") parse as one-letter schemes: treat them as local paths.
    return parsed.scheme.lower() if len(parsed.scheme) > 1 else ""


def is_remote(location: str) -> bool:
    return _scheme(location) not in ("", "file")


def _join(base: str, name: str) -> str:
    if is_remote(base):
        return base.rstrip("/") + "/" + urllib.parse.quote(name)
    return os.path.join(base, name)


class _Closing:
    """A context manager that calls ``close()`` on exit (the read wrappers below)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _CheckedReader(_Closing):
    """File-like wrapper of an HTTP response: raises ConnectionError on a premature EOF.

    ``http.client`` returns b"" when a server closes the connection before Content-Length
    bytes were sent; tarfile would then see a clean end of archive at a header boundary.
    """

    def __init__(self, resp, url: str) -> None:
        self._resp = resp
        self._url = url
        length = resp.headers.get("Content-Length")
        self._left = int(length) if length is not None and length.isdigit() else None
        self._got = 0

    def read(self, n: int = -1) -> bytes:
        data = self._resp.read(n) if n is not None and n >= 0 else self._resp.read()
        self._got += len(data)
        if self._left is not None:
            self._left -= len(data)
            if not data and n != 0 and self._left > 0:
                raise ConnectionError(f"{self._url}: connection closed after {self._got} bytes, "
                                      f"{self._left} missing")
        return data

    def close(self) -> None:
        self._resp.close()


class _BackendReader(_Closing):
    """File-like wrapper of an fsspec file: a read that fails with the backend's own exception
    type raises OSError (ConnectionError) instead, chained to it.

    fsspec backends raise their transport's exceptions when a connection drops: s3fs, once its
    own retries are spent, re-raises aiohttp.ClientPayloadError or a botocore error, neither an
    OSError. ``read_segment`` retries and counts OSErrors only; anything else would stop the
    worker (and the run) instead of being retried or counted as a ``read`` error.
    """

    def __init__(self, f, url: str) -> None:
        self._f = f
        self._url = url

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - any transport failure of the backend is a read error
            raise ConnectionError(f"{self._url}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._f.close()


def open_stream(url: str, timeout: float = 60.0) -> IO[bytes]:
    """Open ``url`` for sequential reading. Raises :class:`ShardMissing` if it does not exist,
    another OSError (or ConnectionError, TimeoutError) when it cannot be read."""
    scheme = _scheme(url)
    if scheme in ("", "file"):
        path = urllib.parse.urlparse(url).path if scheme == "file" else url
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ShardMissing(f"{url}: no such file") from None
    if scheme in ("http", "https"):
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - user-given dataset URL
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise ShardMissing(f"{url}: HTTP {exc.code}") from None
            raise OSError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise OSError(f"{url}: {exc.reason}") from None
        return _CheckedReader(resp, url)  # type: ignore[return-value]
    try:
        import fsspec  # noqa: PLC0415 - optional; only for s3://, gs://, ...
    except ImportError:
        raise UserError(f"{url}: scheme {scheme!r} needs fsspec and its {scheme} backend "
                        f"(pip install fsspec and e.g. s3fs/gcsfs)") from None
    try:
        f = fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise ShardMissing(f"{url}: no such object") from None
    except (ImportError, ValueError) as exc:
        raise UserError(f"{url}: cannot open with fsspec: {exc}") from None
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. botocore's EndpointConnectionError, NoCredentialsError
        raise OSError(f"{url}: {type(exc).__name__}: {exc}") from exc
    return _BackendReader(f, url)  # type: ignore[return-value]


@dataclass
class DatasetIndex:
    """A dataset's ``index.json``: where it lives, its classes and its shards (name, URL, samples)."""

    location: str
    name: str
    classes: list[str]
    shards: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(n for _, _, n in self.shards)


def open_index(location: str, timeout: float = 60.0) -> DatasetIndex:
    """Read ``index.json`` from a dataset folder/URL (or the path/URL of the index itself).

    Raises UserError naming the location when it is missing or not a vidssl dataset.
    """
    loc = location.rstrip("/") if len(location) > 1 else location
    if loc.endswith(".json"):
        index_url = loc
        base = loc.rsplit("/", 1)[0] if is_remote(loc) else os.path.dirname(loc) or "."
    else:
        index_url = _join(loc, "index.json")
        base = loc
    try:
        with open_stream(index_url, timeout) as f:
            raw = f.read()
    except ShardMissing:
        hint = "" if is_remote(loc) or os.path.isdir(loc) else " (the folder does not exist)"
        raise UserError(f"dataset {location!r}: no index.json at {index_url}{hint}; expected a folder written "
                        f"by 'vidssl shard'") from None
    except OSError as exc:
        raise UserError(f"dataset {location!r}: cannot read {index_url}: {exc}") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"dataset {location!r}: {index_url} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != "vidssl-shards":
        raise UserError(f"dataset {location!r}: {index_url} is not a vidssl shard index "
                        f"(expected \"format\": \"vidssl-shards\")")
    if data.get("version") != 1:
        raise UserError(f"dataset {location!r}: index version {data.get('version')!r}; this vidssl reads version 1")
    shards = []
    for i, s in enumerate(data.get("shards") or []):
        try:
            name, n = str(s["name"]), int(s["samples"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"dataset {location!r}: shards[{i}] lacks a name or an integer sample count") from None
        if n < 0:
            raise UserError(f"dataset {location!r}: shards[{i}] ({name}) has {n} samples")
        shards.append((name, _join(base, name), n))
    if not shards or sum(n for _, _, n in shards) == 0:
        raise UserError(f"dataset {location!r}: the index lists no samples")
    return DatasetIndex(location=location, name=str(data.get("name") or os.path.basename(loc)),
                        classes=[str(c) for c in data.get("classes") or []], shards=shards)

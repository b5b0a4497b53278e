"""The streaming loader on ``s3://`` datasets (fsspec + s3fs) against a local moto S3 server.

Everything runs on 127.0.0.1: moto in server mode, and in front of it a small TCP proxy that can
cut a chosen GET response after some bytes of its body (a connection dropped mid-shard). The
endpoint is given the standard way, through ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import os
import socket
import tarfile
import threading

import pytest
from loaderkit import labelled_dataset, same

pytest.importorskip("s3fs", reason="s3:// datasets need s3fs (pip install -e .[s3]; it is in the dev extra)")
pytest.importorskip("moto.server", reason="the S3 tests run a moto server (pip install 'moto[server]', in the dev extra)")
av = pytest.importorskip("av")

import boto3  # noqa: E402 - after the skips (boto3 comes with moto)
import fsspec  # noqa: E402
import s3fs  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from vidssl.data import DataConfig, build_loader  # noqa: E402
from vidssl.data.index import open_index  # noqa: E402
from vidssl.errors import RuntimeFailure, UserError  # noqa: E402

BUCKET = "vids"
#: s3fs reads ahead in blocks (default 50 MiB: one GET per small shard). Small blocks make a shard
#: take several GETs, so a cut GET can land after the first sample of the shard was read.
BLOCK = 4096


# ---- data (same approach as tests/test_data_loader.py) ------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 clips of 14..30 frames, 64x48, labelled → 3 shards of 2 samples."""
    return labelled_dataset(tmp_path_factory.mktemp("s3data"), 6, lambda i: 14 + (i * 7) % 17, ["left", "right"],
                            shard_samples=2)


def _tars(ds):
    return sorted(n for n in os.listdir(ds) if n.endswith(".tar"))


def _files(ds):
    """Every file of the dataset folder, as paths relative to it."""
    return sorted(os.path.relpath(os.path.join(d, f), ds) for d, _, fs in os.walk(ds) for f in fs)


def _upload(client, ds):
    for rel in _files(ds):
        client.upload_file(str(ds / rel), BUCKET, "ds/" + rel.replace(os.sep, "/"))


def _second_sample_read(ds, name) -> int:
    """A byte offset of shard ``name`` that is read only after its first sample was yielded: one
    tar record (10 KiB, tarfile's stream read size) past the header of the second sample."""
    with tarfile.open(ds / name) as tf:
        members = tf.getmembers()
    first_key = members[0].name.split(".", 1)[0]
    second = next(m for m in members if m.name.split(".", 1)[0] != first_key)
    return second.offset + 512 + tarfile.RECORDSIZE


# ---- a TCP proxy that can drop a GET mid-body ---------------------------------------------------

def _read_head(f) -> bytes | None:
    lines = []
    while True:
        line = f.readline(65537)
        if not line:
            return None if not lines else b"".join(lines)
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


class CuttingProxy:
    """Forwards HTTP/1.1 (one request at a time per connection, keep-alive) from 127.0.0.1 to
    ``upstream``. After ``cut(suffix, from_byte, after)``, the first GET of a path ending in
    ``suffix`` whose Range starts at or after ``from_byte`` is forwarded up to ``after`` bytes of
    its response body, then both connections are closed (once; later GETs pass)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.rule: tuple[str, int, int] | None = None
        self.cuts = 0      # responses cut since the rule was set
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self, suffix: str | None, from_byte: int = 0, after: int = 300) -> None:
        with self.lock:
            self.rule = (suffix, from_byte, after) if suffix else None
            self.cuts = 0

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _decide(self, head: bytes) -> int | None:
        method, target = head.split(b" ", 2)[:2]
        with self.lock:
            if self.rule is None or self.cuts or method != b"GET":
                return None
            suffix, from_byte, after = self.rule
            if not target.split(b"?", 1)[0].decode().endswith(suffix):
                return None
            rng = (_header(head, b"range") or b"bytes=0-").decode()
            if int(rng.split("=", 1)[1].split("-", 1)[0] or 0) < from_byte:
                return None
            self.cuts += 1
            return after

    def _serve(self, client: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=30)
            client.settimeout(30)
            cf, uf = client.makefile("rb"), up.makefile("rb")
            while True:
                head = _read_head(cf)
                if not head:
                    return
                method = head.split(b" ", 1)[0]
                assert _header(head, b"transfer-encoding") is None, "chunked requests are not proxied"
                n = int(_header(head, b"content-length") or 0)
                up.sendall(head + (cf.read(n) if n else b""))
                rhead = _read_head(uf)
                if not rhead:
                    return
                assert _header(rhead, b"transfer-encoding") is None, "chunked responses are not proxied"
                status = int(rhead.split(b" ", 2)[1])
                size = 0 if method == b"HEAD" or status in (204, 304) else int(_header(rhead, b"content-length") or 0)
                cut_at = self._decide(head)
                client.sendall(rhead)
                sent = 0
                while sent < size:
                    chunk = uf.read1(min(65536, size - sent))
                    if not chunk:
                        return
                    if cut_at is not None and sent + len(chunk) >= cut_at:
                        client.sendall(chunk[: cut_at - sent])
                        return  # drop: close both ends mid-body
                    client.sendall(chunk)
                    sent += len(chunk)
        except OSError:
            return
        finally:
            for s in (client, locals().get("up")):
                if s is not None:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()


# ---- S3 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(dataset, tmp_path_factory):
    """A moto S3 server with the dataset under s3://vids/ds/, a cutting proxy in front of it, and
    the environment of an S3 client pointed at the proxy (restored afterwards)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = CuttingProxy((host, port))
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            mp.delenv(k, raising=False)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", nowhere)              # a developer's ~/.aws must not interfere
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        mp.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        mp.setitem(fsspec.config.conf, "s3", {"default_block_size": BLOCK})
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
        client.create_bucket(Bucket=BUCKET)
        _upload(client, dataset)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made elsewhere may hold another endpoint
        yield type("S3", (), {"client": client, "proxy": proxy, "moto": f"http://{host}:{port}"})
        s3fs.S3FileSystem.clear_instance_cache()
    proxy.close()
    server.stop()


@pytest.fixture
def bucket(s3, dataset):
    """s3://vids/ds as uploaded; objects deleted by a test are put back, a cut rule is cleared."""
    yield s3
    s3.proxy.cut(None)
    _upload(s3.client, dataset)
    s3fs.S3FileSystem.clear_instance_cache()  # no cached listing/metadata between tests


def cfg(ds, **kw):
    base = dict(dataset=str(ds), batch_size=2, workers=0, frames=4, stride=2, future=2, gap_min=2, gap_max=10,
                crop_size=32, shuffle_buffer=4, seed=5)
    base.update(kw)
    return DataConfig(**base)


_same = same  # exact batch equality (tests/loaderkit.py)


def _same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        _same(x, y)


def _load(c):
    loader = build_loader(c, rank=0, world_size=1)
    try:
        return list(loader), loader.stats
    finally:
        loader.close()


URL = f"s3://{BUCKET}/ds"


# ---- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("var", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_endpoint_from_the_standard_environment_variables(bucket, dataset, monkeypatch, var):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv(var, bucket.moto)
    s3fs.S3FileSystem.clear_instance_cache()
    idx = open_index(URL)
    local = open_index(str(dataset))
    assert idx.classes == local.classes == ["left", "right"]
    assert [(n, k) for n, _, k in idx.shards] == [(n, k) for n, _, k in local.shards]
    assert idx.shards[0][1] == f"{URL}/{idx.shards[0][0]}"


@pytest.mark.parametrize("mode,workers", [("ssl", 0), ("clip", 2)])
def test_s3_streaming_matches_local(bucket, dataset, mode, workers):
    local, _ = _load(cfg(dataset, mode=mode, workers=workers, drop_last=False))
    remote, stats = _load(cfg(URL, mode=mode, workers=workers, drop_last=False))
    assert len(remote) == 3 and sorted(k for b in remote for k in b["key"]) == sorted(k for b in local for k in b["key"])
    _same_batches(remote, local)
    assert not stats["errors"]


def test_missing_shard_object_is_counted_and_budgeted(bucket, dataset):
    name = _tars(dataset)[1]
    bucket.client.delete_object(Bucket=BUCKET, Key=f"ds/{name}")
    batches, stats = _load(cfg(URL, mode="clip", augment="none", drop_last=False, max_error_fraction=0.9))
    assert len(batches) == 3
    assert stats["errors"] == {"missing": 2} and stats["error_shards"] == {name: 2}
    assert sum((~b["valid"]).sum().item() for b in batches) == 2
    with pytest.raises(RuntimeFailure, match=r"failed \(missing [12]\)") as exc:
        _load(cfg(URL, mode="clip", augment="none"))  # default budget: max_error_fraction=0.01
    assert name in str(exc.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_connection_dropped_mid_shard_is_reopened(bucket, dataset, monkeypatch, workers):
    # s3fs retries a broken body read itself (S3FileSystem.retries, default 5, with backoff);
    # with one attempt the drop reaches vidssl's own retry (read_segment reopens the shard).
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    name = _tars(dataset)[1]
    c = dict(mode="clip", augment="none", drop_last=False, workers=workers)
    local, _ = _load(cfg(dataset, **c))
    bucket.proxy.cut(name, _second_sample_read(dataset, name))  # its first sample was read already
    remote, stats = _load(cfg(URL, retries=1, **c))
    assert bucket.proxy.cuts == 1
    assert not stats["errors"]
    _same_batches(remote, local)


def test_connection_dropped_mid_shard_without_retries_is_counted(bucket, dataset, monkeypatch):
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    name = _tars(dataset)[1]
    c = dict(mode="clip", augment="none", drop_last=False)
    bucket.proxy.cut(name, _second_sample_read(dataset, name))
    batches, stats = _load(cfg(URL, retries=0, max_error_fraction=0.9, **c))
    assert bucket.proxy.cuts == 1
    assert stats["errors"] == {"read": 1} and stats["error_shards"] == {name: 1}  # the shard's 2nd sample
    assert sum((~b["valid"]).sum().item() for b in batches) == 1
    bucket.proxy.cut(name, _second_sample_read(dataset, name))
    with pytest.raises(RuntimeFailure, match=name):
        _load(cfg(URL, retries=0, **c))


def test_s3fs_own_retries_absorb_a_single_drop(bucket, dataset):
    # With s3fs's default retries a single dropped response never reaches vidssl, even with retries=0.
    name = _tars(dataset)[1]
    c = dict(mode="clip", augment="none", drop_last=False)
    local, _ = _load(cfg(dataset, **c))
    bucket.proxy.cut(name, _second_sample_read(dataset, name))
    remote, stats = _load(cfg(URL, retries=0, **c))
    assert bucket.proxy.cuts == 1 and not stats["errors"]
    _same_batches(remote, local)


def test_missing_index_is_a_clear_user_error(bucket):
    with pytest.raises(UserError, match=f"no index.json at s3://{BUCKET}/nothing-here/index.json"):
        build_loader(cfg(f"s3://{BUCKET}/nothing-here"), rank=0, world_size=1)
    with pytest.raises(UserError, match="no index.json at s3://no-such-bucket/ds/index.json"):
        build_loader(cfg("s3://no-such-bucket/ds"), rank=0, world_size=1)


def test_unreachable_endpoint_is_a_clear_user_error(bucket, monkeypatch):
    # botocore raises its own EndpointConnectionError (not an OSError): still a UserError naming the URL.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")                # botocore's retries
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)       # s3fs's
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(UserError, match=f"cannot read {URL}/index.json: .*EndpointConnectionError"):
        build_loader(cfg(URL), rank=0, world_size=1)

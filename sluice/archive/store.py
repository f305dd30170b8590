"""Object stores and the Hive-style layout archives are written in.

Layout: <prefix>/app=<app>/dt=<YYYY-MM-DD>/hour=<HH>/<app>.<fid>.jsonl.zst, so query engines
can prune by partition and `sluice fetch` lists only the hours it needs.

Late records of an app-hour that already has its N objects are merged into one of them
(sluice.archive.uploader): the merge is written as the next generation of that object,
`<app>.<fid>.g<N>.jsonl.zst`, before the one it replaces is deleted. A reader takes only the
newest generation of each object (`live_keys`), so it never sees a record twice or not at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from sluice.core.errors import Damaged
from sluice.core.settings import Settings
from sluice.formats.frames import IndexEntry, index_length, index_span, parse_index
from sluice.formats.spool import can_sync_filesystem, fsync_dir, sync_filesystem


def hour_prefix(app: str, hour: str) -> str:
    """Key prefix of one app-hour; `hour` is YYYYMMDDHH (UTC)."""
    return f"app={app}/dt={hour[0:4]}-{hour[4:6]}-{hour[6:8]}/hour={hour[8:10]}/"


def object_key(app: str, hour: str, fid: str, generation: int = 0) -> str:
    suffix = f".g{generation}" if generation else ""
    return f"{hour_prefix(app, hour)}{app}.{fid}{suffix}.jsonl.zst"


def lineage(key: str) -> tuple[str, int]:
    """(the object's first fid, its generation) from its key."""
    name = key.rsplit("/", 1)[-1].removesuffix(".jsonl.zst")
    base, _, last = name.rpartition(".")
    if last.startswith("g") and last[1:].isdigit():
        return base, int(last[1:])
    return name, 0


def next_generation(key: str) -> str:
    """The key a merge into this object is written under."""
    prefix, _, _ = key.rpartition("/")
    base, generation = lineage(key)
    return f"{prefix}/{base}.g{generation + 1}.jsonl.zst"


# Objects of an app's lines gathered from tail files (sluice.archive.tail) are named
# <app>.tail-<first tail file's fid>[.g<N>].jsonl.zst.
TAIL_OBJECT = "tail-"


def is_tail_object(app: str, key: str) -> bool:
    """Whether an object of `app` holds its lines gathered from tail files."""
    return lineage(key)[0].removeprefix(f"{app}.").startswith(TAIL_OBJECT)


def live_keys(keys: list[str]) -> list[str]:
    """The newest generation of each object: what a reader reads, sorted."""
    newest: dict[str, tuple[int, str]] = {}
    for key in keys:
        base, generation = lineage(key)
        if base not in newest or newest[base][0] < generation:
            newest[base] = (generation, key)
    return sorted(key for _, key in newest.values())


# How much of an object's tail is read to find its index: the index of about 1,800 frames.
INDEX_PROBE_BYTES = 64 * 1024


def content_length(store: Store, key: str) -> int | None:
    """Bytes of an object before its index (all of them if it has none: written before
    indexes); None if there is no such object."""
    size = store.size(key)
    if size is None:
        return None
    try:
        return size - index_length(len(read_index(store, key, size)))
    except Damaged:
        return size


def read_index(store: Store, key: str, size: int) -> list[IndexEntry]:
    """An object's index, from one ranged read of its tail (two if it is long); Damaged if it
    has none or it cannot be trusted."""
    tail = store.read_range(key, max(0, size - INDEX_PROBE_BYTES), size)
    span = index_span(tail)
    if span is not None and span > len(tail) and span <= size:
        tail = store.read_range(key, size - span, size)
    return parse_index(tail, size)



class ObjectStream(Protocol):
    """An object being read: a local file, or an OSS download checked against its CRC-64."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> "ObjectStream": ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any: ...


def open_newest(store: "Store", prefix: str, key: str) -> ObjectStream:
    """Open an object, or the generation that replaced it after it was listed (a merge of late
    records), which holds all of it."""
    try:
        return store.open(key)
    except FileNotFoundError:
        base = lineage(key)[0]
        successors = [k for k in live_keys(store.list(prefix)) if lineage(k)[0] == base and k != key]
        if not successors:
            raise
        return store.open(successors[0])


class Store(Protocol):
    """What the uploader and `sluice fetch` need from an object store."""

    def put(self, local: Path, key: str) -> None:
        """Upload and verify; raises if the stored object is not the local file."""

    def put_objects(self, objects: list[tuple[str, bytes]]) -> None:
        """Upload many small objects (key, bytes) at once; raises if any is not stored whole.
        Each object is whole or absent at any moment, as with `put`."""

    def size(self, key: str) -> int | None:
        """Size of an object, None if it does not exist."""

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object; IOError if fewer come back, FileNotFoundError if
        there is no such object."""

    def apps(self) -> list[str]:
        """The apps with objects (the `app=` prefixes), sorted."""

    def list(self, prefix: str) -> list[str]:
        """Keys under a prefix, sorted."""

    def open(self, key: str) -> ObjectStream:
        """A readable binary stream of an object; FileNotFoundError if there is none."""

    def delete(self, key: str) -> None:
        """Remove an object; no error if it is gone already."""


class FileStore:
    """A local directory (or mounted NAS) as the store: the embedded default."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        """The path of a key (or listing prefix), refused if it would leave the store: checked
        on the key's text, not by resolving the path (a syscall per component, per object)."""
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"object key {key!r} escapes the store")
        return self.root / key

    def put(self, local: Path, key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with open(local, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        if _sha256(tmp) != _sha256(local):
            tmp.unlink()
            raise IOError(f"verification of {key} failed: stored bytes differ")
        tmp.replace(dest)
        fsync_dir(dest.parent)  # the spool copy is deleted next: the archived one must stay

    def put_objects(self, objects: list[tuple[str, bytes]]) -> None:
        """Written under temporary names, made durable together (one syncfs where it reports
        errors, else an fsync each), then renamed into place and made durable again."""
        if not objects:
            return
        written: list[tuple[Path, Path]] = []
        each = not can_sync_filesystem()
        for key, data in objects:
            dest = self._path(key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            with open(tmp, "wb") as out:
                out.write(data)
                if each:
                    out.flush()
                    os.fsync(out.fileno())
            if tmp.stat().st_size != len(data):
                raise IOError(f"verification of {key} failed: {tmp.stat().st_size} bytes stored, {len(data)} sent")
            written.append((tmp, dest))
        if not each:
            sync_filesystem(self.root)
        for tmp, dest in written:
            tmp.replace(dest)
        if not each:
            sync_filesystem(self.root)
        else:
            for parent in {dest.parent for _, dest in written}:
                fsync_dir(parent)

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with open(self._path(key), "rb") as fh:
            data = os.pread(fh.fileno(), end - start, start)
        if len(data) != end - start:
            raise IOError(f"{key}: {len(data)} bytes at {start}, {end - start} asked for")
        return data

    def apps(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[len("app="):] for p in self.root.iterdir() if p.name.startswith("app=") and p.is_dir())

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*.jsonl.zst") if p.is_file())

    def open(self, key: str) -> ObjectStream:
        return open(self._path(key), "rb")

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class OssStore:
    """Aliyun OSS through oss2: resumable multipart above the threshold, CRC-64 checked both ways."""

    def __init__(self, bucket_name: str, prefix: str, settings: Settings) -> None:
        import oss2

        self._oss2 = oss2
        self.bucket = oss2.Bucket(oss_auth(settings), settings.oss_endpoint, bucket_name, enable_crc=True)
        self.prefix = prefix.strip("/")
        self.threshold = settings.oss_multipart_threshold

    def _key(self, key: str) -> str:
        """The full key of `key` (or of a listing prefix ending in '/') under the store's prefix."""
        parts = key.removesuffix("/").split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"object key {key!r} would leave the store's prefix")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, local: Path, key: str) -> None:
        full = self._key(key)
        self._oss2.resumable_upload(self.bucket, full, str(local),
                                    multipart_threshold=self.threshold, num_threads=4)
        stored = self.bucket.head_object(full).content_length
        if stored != local.stat().st_size:
            raise IOError(f"verification of {full} failed: {stored} bytes stored, "
                          f"{local.stat().st_size} sent")

    def put_objects(self, objects: list[tuple[str, bytes]]) -> None:
        """One PUT each, several at once; oss2 checks each against the CRC-64 the server returns."""
        from concurrent.futures import ThreadPoolExecutor

        def put(item: tuple[str, bytes]) -> None:
            key, data = item
            self.bucket.put_object(self._key(key), data)

        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="oss-put") as pool:
            list(pool.map(put, objects))

    def size(self, key: str) -> int | None:
        try:
            return self.bucket.head_object(self._key(key)).content_length
        except self._oss2.exceptions.NotFound:
            return None

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """A ranged GET, its length checked (a range past the end would come back short)."""
        try:
            result = self.bucket.get_object(self._key(key), byte_range=(start, end - 1),
                                            headers={"x-oss-range-behavior": "standard"})
        except self._oss2.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        data = result.read()
        if len(data) != end - start:
            raise IOError(f"{key}: {len(data)} bytes at {start}, {end - start} asked for")
        return data

    def apps(self) -> list[str]:
        """One delimited listing: the common prefixes, not the objects."""
        base = f"{self.prefix}/app=" if self.prefix else "app="
        found = [obj.key for obj in self._oss2.ObjectIterator(self.bucket, prefix=base, delimiter="/")
                 if obj.is_prefix()]
        return sorted(key[len(base):].rstrip("/") for key in found)

    def list(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = [obj.key[strip:] for obj in self._oss2.ObjectIterator(self.bucket, prefix=self._key(prefix))]
        return sorted(k for k in keys if k.endswith(".jsonl.zst"))

    def open(self, key: str) -> ObjectStream:
        try:
            return _CrcChecked(self.bucket.get_object(self._key(key)), key)
        except self._oss2.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None

    def delete(self, key: str) -> None:
        self.bucket.delete_object(self._key(key))


class _CrcChecked:
    """An object being read; at its end, the CRC-64 of what was read must be the server's.

    oss2 computes it while reading but leaves the comparison to the caller (only its
    get_object_to_file compares), so a damaged read would otherwise go unnoticed."""

    def __init__(self, result: Any, key: str) -> None:
        self.result, self.key = result, key

    def read(self, n: int = -1) -> bytes:
        data = self.result.read(n if n >= 0 else None)
        if not data or n < 0:
            server = self.result.server_crc
            if server is not None and self.result.client_crc != server:
                raise IOError(f"{self.key}: CRC-64 of the bytes read does not match the store's")
        return data

    def close(self) -> None:
        self.result.close()

    def __enter__(self) -> "_CrcChecked":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()


def oss_auth(settings: Settings) -> Any:
    """oss2's signer for SLUICE_OSS_CREDENTIALS: a static key pair, an STS key pair and token, or
    the ECS instance's RAM role (fetched and renewed from the instance metadata service)."""
    import oss2
    from oss2.credentials import EcsRamRoleCredentialsProvider

    if settings.oss_credentials == "ecs_ram_role":
        url = settings.oss_ecs_metadata_url.rstrip("/") + "/" + settings.oss_ecs_ram_role
        return oss2.ProviderAuth(EcsRamRoleCredentialsProvider(url))
    key_id = settings.oss_access_key_id.get_secret_value()
    secret = settings.oss_access_key_secret.get_secret_value()
    if settings.oss_credentials == "sts":
        return oss2.StsAuth(key_id, secret, settings.oss_security_token.get_secret_value())
    return oss2.Auth(key_id, secret)


def open_store(settings: Settings) -> Store:
    url = settings.store_url
    if url.startswith("file://"):
        return FileStore(Path(url[len("file://"):]))
    if url.startswith("oss://"):
        bucket, _, prefix = url[len("oss://"):].partition("/")  # checked by Settings
        return OssStore(bucket, prefix, settings)
    raise ValueError(f"unsupported store_url {url!r}")


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.digest()

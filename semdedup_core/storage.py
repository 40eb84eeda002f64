"""Where bytes live: local folders and `s3://` prefixes as one `Storage` type, atomic writes,
and safe extraction of `.zip` inputs. The only module that knows about S3 and zip files."""

import configparser
import contextlib
import errno
import hashlib
import io
import os
import posixpath
import shutil
import stat
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from semdedup_core.config import DedupConfig, is_zip_path
from semdedup_core.errors import ConfigError, InputError, SemdedupError, StorageError
from semdedup_core.threads import LATENCY_BOUND_THREADS

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: a named profile, an endpoint for S3-compatible stores, a region.
    Unset fields fall back to the standard AWS chain (environment, profile files, roles)."""

    profile: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    # Explicit keys (e.g. from a Dagster resource's EnvVar); never shown in repr.
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: DedupConfig, base: "S3Options | None" = None) -> "S3Options":
        """The run's settings, falling back to `base` (a deployment's defaults) field by field."""
        base = base or cls()
        return replace(base, profile=cfg.aws_profile or base.profile,
                       endpoint_url=cfg.aws_endpoint_url or base.endpoint_url,
                       region=cfg.aws_region or base.region)


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


# Storage faults as one line: substrings of boto3's and pyarrow's (AWS SDK) messages.
_FAULTS = [
    (("NoSuchBucket", "NO_SUCH_BUCKET", "specified bucket does not exist"),
     "the bucket does not exist"),
    (("AccessDenied", "ACCESS_DENIED", "Forbidden"),
     "access denied (check the credentials, the profile and the bucket policy)"),
    (("InvalidAccessKeyId", "SignatureDoesNotMatch", "INVALID_ACCESS_KEY", "SIGNATURE"),
     "the credentials were refused"),
    (("Could not connect", "Connection refused", "curlCode: 7", "Failed to connect",
      "Couldn't connect", "EndpointConnectionError", "Could not resolve"),
     "cannot reach the storage endpoint"),
    (("retries", "Max retries", "RequestTimeout", "Read timeout", "curlCode: 28"),
     "gave up after retries"),
]


def describe_fault(exc: BaseException) -> str:
    """A storage exception as a short reason: a known fault in words, else its first line."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable ({exc.strerror})"
    text = f"{type(exc).__name__}: {exc}"
    for needles, reason in _FAULTS:
        if any(n in text for n in needles):
            return reason
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _storage_faults():
    """The exception types a storage operation raises for a fault (not for a bug)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (OSError, ClientError, BotoCoreError)


@contextlib.contextmanager
def storage_faults(where: str, doing: str) -> Iterator[None]:
    """Turn a storage fault inside the block into one StorageError line naming `where`."""
    try:
        yield
    except SemdedupError:
        raise
    except FileNotFoundError:
        raise
    except _storage_faults() as exc:
        raise StorageError(f"{where}: cannot {doing}: {describe_fault(exc)}") from exc


def _profile_region(profile: str | None) -> str | None:
    """`region` from the credentials file's profile: the AWS SDKs only read it from ~/.aws/config,
    but curation teams commonly keep it beside the keys."""
    path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser()
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return None
    section = profile or os.environ.get("AWS_PROFILE") or "default"
    return parser.get(section, "region", fallback=None)


S3_ATTEMPTS = 8  # per request, for boto3 and pyarrow alike (pyarrow's own default is 3)


def s3_attempts() -> int:
    """Attempts per S3 request: AWS_MAX_ATTEMPTS (the AWS SDKs' setting) or S3_ATTEMPTS."""
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", S3_ATTEMPTS)))
    except ValueError:
        return S3_ATTEMPTS


@dataclass(frozen=True)
class S3Access:
    """Resolved S3 settings: the credential chain walked once, by boto3."""

    region: str
    endpoint_url: str | None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, opts: S3Options) -> "S3Access":
        import boto3
        from botocore.exceptions import ProfileNotFound

        try:
            session = boto3.Session(profile_name=opts.profile)
        except ProfileNotFound:
            raise ConfigError(f"aws_profile {opts.profile!r}: no such profile in the AWS "
                              "credentials or config files") from None
        key = secret = token = None
        if opts.access_key_id:
            key, secret, token = opts.access_key_id, opts.secret_access_key, opts.session_token
        elif (creds := session.get_credentials()) is not None:
            frozen = creds.get_frozen_credentials()
            key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
        region = (opts.region or session.region_name or _profile_region(opts.profile)
                  or os.environ.get("AWS_REGION") or "us-east-1")
        endpoint = (opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        return cls(region, endpoint, key, secret, token)

    def filesystem(self) -> pafs.S3FileSystem:
        """pyarrow's S3 filesystem: ranged reads of parquet, listings."""
        kwargs: dict = {"region": self.region}
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key)
            if self.session_token:
                kwargs["session_token"] = self.session_token
        if self.endpoint_url:
            url = self.endpoint_url
            parsed = urlparse(url if "://" in url else "https://" + url)
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=s3_attempts())
        return pafs.S3FileSystem(**kwargs)

    def client(self):
        """A boto3 S3 client: uploads (a single PUT, or a multipart upload that is completed
        only when every part is in and aborted otherwise)."""
        import boto3

        from botocore.config import Config

        # A connection per thread that may read at once (ranged GETs of store segments), so
        # none is dropped and opened again (a TLS handshake each on AWS).
        return boto3.client("s3", region_name=self.region, endpoint_url=self.endpoint_url,
                            config=Config(retries={"max_attempts": s3_attempts(),
                                                   "mode": "standard"},
                                          max_pool_connections=LATENCY_BOUND_THREADS),
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            aws_session_token=self.session_token)


class Storage:
    """A root folder, local or `s3://bucket/prefix`; every path argument is relative to it."""

    def __init__(self, uri: str, s3: S3Options | None = None):
        self.uri = uri.rstrip("/") if uri not in ("/", S3_SCHEME) else uri
        self._client = None
        self._client_lock = threading.Lock()  # writes come from several host threads
        if is_s3(uri):
            self.s3: S3Access | None = S3Access.resolve(s3 or S3Options())
            self.fs: pafs.FileSystem = self.s3.filesystem()
            self.root = self.uri[len(S3_SCHEME):]
            self.local = False
        else:
            self.s3 = None
            self.fs = pafs.LocalFileSystem()
            self.root = str(Path(uri).expanduser().absolute())
            self.local = True

    def __repr__(self) -> str:  # never shows credentials
        return f"Storage({self.uri!r})"

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def display(self, rel: str = "") -> str:
        """The user-facing address of `rel`, for messages."""
        return posixpath.join(self.uri, rel) if rel else self.uri

    def _derived(self, uri: str, root: str) -> "Storage":
        """Another folder of the same filesystem, sharing its connection settings."""
        other = Storage.__new__(Storage)
        other.__dict__.update(self.__dict__)
        other.uri, other.root = uri, root
        return other

    def child(self, rel: str) -> "Storage":
        """The folder `rel` below this one, sharing its connection settings."""
        return self._derived(posixpath.join(self.uri, rel), posixpath.join(self.root, rel))

    def parent(self) -> "Storage | None":
        """The folder above (None at a bucket or filesystem root, or inside an extracted zip)."""
        if self.uri.endswith("!") or "/" not in self.root.strip("/"):
            return None
        return self._derived(posixpath.dirname(self.uri.rstrip("/")),
                             posixpath.dirname(self.root.rstrip("/")))

    def parent_of_file(self) -> "Storage":
        """The folder holding this Storage's root, when the root is a single file."""
        return self._derived(posixpath.dirname(self.uri.rstrip("/")),
                             posixpath.dirname(self.root.rstrip("/")))

    # -- reading -----------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def list_files(self, rel: str = "", recursive: bool = True) -> list[str]:
        """Relative paths of the files under `rel`, sorted; [] when it does not exist."""
        return [path for path, _, _ in self.list_file_infos(rel, recursive)]

    def list_file_infos(self, rel: str = "", recursive: bool = True
                        ) -> list[tuple[str, int, float]]:
        """(relative path, size, modification time in seconds) of every file under `rel`."""
        return self.list_level(rel, recursive)[0]

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the folders directly under `rel`, sorted."""
        return self.list_level(rel)[1]

    def list_level(self, rel: str = "", recursive: bool = False
                   ) -> tuple[list[tuple[str, int, float]], list[str]]:
        """One listing (one request chain on S3): (path, size, mtime) of the files under `rel`
        and the names of the folders directly under it, both sorted."""
        selector = pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
        files, dirs, base = [], [], posixpath.normpath(self.path(rel))
        prefix = posixpath.normpath(self.root).rstrip("/") + "/"
        for i in self.fs.get_file_info(selector):
            if i.type == pafs.FileType.File:
                # A prefix cut, not posixpath.relpath: 80 us a file, 1.7 s at 20,000 files.
                path = i.path[len(prefix):] if i.path.startswith(prefix) \
                    else posixpath.relpath(i.path, self.root)
                files.append((path, i.size or 0, i.mtime.timestamp() if i.mtime else 0.0))
            elif i.type == pafs.FileType.Directory and posixpath.dirname(i.path) == base:
                dirs.append(posixpath.basename(i.path))
        return sorted(files), sorted(dirs)

    def open_input(self, rel: str):
        """A random-access pyarrow file (parquet reads only the ranges they need)."""
        return self.fs.open_input_file(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def open_mapped(self, rel: str):
        """A random-access file for whole reads (`read_buffer`) or many small positional ones
        (`read_at`, safe from several threads): locally a memory map, whose reads are views of
        pages the OS caches (no copy, no decode); on S3 an `S3Object`, each read one GET."""
        if self.local:
            return pa.memory_map(self.path(rel))
        return S3Object(self, rel)

    # -- writing -----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data) -> None:
        """Write `data` (bytes-like) as a whole file, atomically: readers see the old file or
        the new one, never a part.
        Locally: a temporary name in the same folder, then rename. On S3: a PUT, or a multipart
        upload that S3 only makes visible once completed (and that is aborted on failure)."""
        with storage_faults(self.display(rel), "write"):
            self._write_bytes(rel, data)

    def _write_bytes(self, rel: str, data) -> None:
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = posixpath.join(os.path.dirname(target),
                                 f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            bucket, key = target.split("/", 1)
            self.client().upload_fileobj(io.BytesIO(data), bucket, key)

    @contextlib.contextmanager
    def writing_file(self, rel: str) -> Iterator[io.BufferedIOBase]:
        """A binary file to write `rel` through piece by piece (memory stays at a piece); it
        appears whole when the block ends without error, and not at all otherwise. Locally: a
        temporary name in the same folder, then rename. On S3: a local temporary file, then one
        upload (multipart when large, visible only once completed)."""
        target = self.path(rel)
        with storage_faults(self.display(rel), "write"):
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = posixpath.join(os.path.dirname(target),
                                     f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
            else:
                fd, tmp = tempfile.mkstemp(prefix="semdedup-upload-", suffix=".tmp")
                os.close(fd)
            try:
                with open(tmp, "wb") as f:
                    yield f
                if self.local:
                    os.replace(tmp, target)
                else:
                    bucket, key = target.split("/", 1)
                    self.client().upload_file(tmp, bucket, key)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def delete_file(self, rel: str) -> None:
        if self.local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(rel))
            return
        # boto3, not pyarrow: pyarrow's S3 delete leaves a zero-byte "folder/" key behind when
        # the folder becomes empty, which a fresh run never writes.
        bucket, key = self.path(rel).split("/", 1)
        self.client().delete_object(Bucket=bucket, Key=key)

    def delete_dir(self, rel: str) -> None:
        if self.local:
            shutil.rmtree(self.path(rel), ignore_errors=True)
            return
        bucket, _, prefix = self.path(rel).rstrip("/").partition("/")
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client().delete_objects(Bucket=bucket, Delete={"Objects": keys,
                                                                    "Quiet": True})

    def client(self):
        """The boto3 S3 client of this storage (one per Storage, shared by its threads)."""
        with self._client_lock:
            if self._client is None:
                self._client = self.s3.client()
        return self._client

    # -- compare-and-swap, for the output lock (semdedup_core/run_record.py) ---------------------
    # A version is an opaque token: the ETag on S3, a content hash locally. Locally the
    # read-compare-write runs under an flock of the folder, so processes on one host agree; on
    # S3 it is a conditional PUT / DELETE (If-None-Match: * or If-Match: <ETag>).
    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """(content, version) of a file, or None when it does not exist."""
        if self.local:
            try:
                with open(self.path(rel), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            return data, hashlib.sha256(data).hexdigest()
        bucket, key = self.path(rel).split("/", 1)
        try:
            got = self.client().get_object(Bucket=bucket, Key=key)
        except self._client_errors() as exc:
            if _s3_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return got["Body"].read(), got["ETag"]

    def write_if(self, rel: str, data: bytes, version: str | None) -> str | None:
        """Write `data` only if the file is absent (`version` None) or still at `version`.
        Returns the new version, or None when the condition failed."""
        if self.local:
            with self._folder_guard():
                current = self.read_versioned(rel)
                if (current[1] if current else None) != version:
                    return None
                self.write_bytes(rel, data)
                return hashlib.sha256(data).hexdigest()
        bucket, key = self.path(rel).split("/", 1)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            return self.client().put_object(Bucket=bucket, Key=key, Body=data,
                                            **condition)["ETag"]
        except self._client_errors() as exc:
            # 412: the condition failed; 409: a concurrent conditional write won the race.
            if _s3_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "412",
                                 "409", "NoSuchKey"):
                return None
            raise

    def delete_if(self, rel: str, version: str) -> bool:
        """Delete the file only if it is still at `version`."""
        if self.local:
            with self._folder_guard():
                current = self.read_versioned(rel)
                if current is None or current[1] != version:
                    return False
                os.unlink(self.path(rel))
                return True
        bucket, key = self.path(rel).split("/", 1)
        try:
            self.client().delete_object(Bucket=bucket, Key=key, IfMatch=version)
            return True
        except self._client_errors() as exc:
            if _s3_code(exc) in ("PreconditionFailed", "NoSuchKey", "412", "404"):
                return False
            raise

    @contextlib.contextmanager
    def _folder_guard(self) -> Iterator[None]:
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    @staticmethod
    def _client_errors():
        from botocore.exceptions import ClientError

        return ClientError

    def abort_multipart_uploads(self) -> int:
        """Abort every unfinished multipart upload under this prefix (left by a killed run; S3
        keeps and bills their parts until aborted). Returns how many. Locally nothing to do."""
        if self.local:
            return 0
        bucket, _, prefix = self.root.partition("/")
        client, n = self.client(), 0
        for page in client.get_paginator("list_multipart_uploads").paginate(
                Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            for up in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=up["Key"],
                                              UploadId=up["UploadId"])
                n += 1
        return n


class S3Object:
    """One S3 object read by GETs alone: whole (`read_buffer`), a range (`read_at`) or its
    last bytes (`read_tail`, for a trailer); the size comes with the first GET's answer, so
    opening costs no HEAD. A fault is one StorageError line naming the file, a missing file a
    FileNotFoundError naming it."""

    def __init__(self, storage: Storage, rel: str):
        self.storage, self.rel = storage, rel
        self.bucket, self.key = storage.path(rel).split("/", 1)
        self._size: int | None = None

    def _get(self, byte_range: str | None = None) -> pa.Buffer:
        from botocore.exceptions import (IncompleteReadError, ReadTimeoutError,
                                         ResponseStreamingError)

        where = self.storage.display(self.rel)
        ranged = {"Range": byte_range} if byte_range else {}
        with storage_faults(where, "read"):
            for attempt in range(s3_attempts()):
                try:
                    got = self.storage.client().get_object(Bucket=self.bucket, Key=self.key,
                                                           **ranged)
                except Storage._client_errors() as exc:
                    if _s3_code(exc) in ("NoSuchKey", "404"):
                        raise FileNotFoundError(errno.ENOENT, "no such file", where) from None
                    if _s3_code(exc) in ("InvalidRange", "416"):  # the tail of an empty file
                        self._size = 0
                        return pa.py_buffer(b"")
                    raise
                try:  # boto3 retries the request; a body cut short is asked for again here
                    data = got["Body"].read()
                    break
                except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError):
                    if attempt + 1 == s3_attempts():
                        raise
        whole = got.get("ContentRange")  # "bytes first-last/size" when ranged
        self._size = int(whole.rsplit("/", 1)[1]) if whole else len(data)
        return pa.py_buffer(data)

    def read_buffer(self) -> pa.Buffer:
        return self._get()

    def read_at(self, nbytes: int, offset: int) -> pa.Buffer:
        if nbytes <= 0:
            return pa.py_buffer(b"")
        return self._get(f"bytes={offset}-{offset + nbytes - 1}")

    def read_tail(self, nbytes: int) -> pa.Buffer:
        """The last `nbytes` (all of it when shorter); `size()` is known after it."""
        return self._get(f"bytes=-{nbytes}")

    def size(self) -> int:
        if self._size is None:
            self.read_tail(1)
        return self._size

    def close(self) -> None:
        pass

    def __enter__(self) -> "S3Object":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _s3_code(exc) -> str:
    err = getattr(exc, "response", {}).get("Error", {})
    return str(err.get("Code") or getattr(exc, "response", {}).get(
        "ResponseMetadata", {}).get("HTTPStatusCode", ""))


# -- zip inputs --------------------------------------------------------------------------------
MACOS_META = "__MACOSX"


def _safe_member_path(name: str) -> str | None:
    """The normalised relative path of a zip member, or None if it would escape the folder."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


def extract_zip_safely(zip_path: str, dest: str, max_bytes: int, display: str) -> None:
    """Extract `zip_path` into `dest`. Refuses members that escape `dest` (absolute paths, `..`),
    symbolic links, and archives whose entries would exceed `max_bytes` uncompressed: the
    declared sizes are checked first, then the bytes actually written are counted."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise InputError(f"{display}: not a valid zip archive") from None
    with archive:
        infos = archive.infolist()
        declared = sum(i.file_size for i in infos)
        if declared > max_bytes:
            raise InputError(f"{display}: would extract to {declared:,} bytes, over the limit of "
                             f"{max_bytes:,} (zip_max_bytes)")
        written = 0
        for info in infos:
            rel = _safe_member_path(info.filename)
            if rel is None:
                raise InputError(f"{display}: member {info.filename!r} would be written outside "
                                 "the extraction folder; refusing the archive")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise InputError(f"{display}: member {info.filename!r} is a symbolic link; "
                                 "refusing the archive")
            if rel.split("/")[0] == MACOS_META:
                continue
            target = os.path.join(dest, rel)
            if info.is_dir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                with storage_faults(f"{display}: extracting {info.filename!r} to {dest}",
                                    "write"), archive.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise InputError(f"{display}: extracts to more than {max_bytes:,} "
                                             "bytes (zip_max_bytes); refusing the archive")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise InputError(f"{display}: member {info.filename!r} is corrupt ({exc})") \
                    from None


SHARED_ZIP_DIR = "semdedup-zip-shared"
SHARED_ZIP_MAX_AGE_S = 24 * 3600  # a kept extraction no later step came for (a killed run)
_COMPLETE = "complete"  # marker written last, holding the input folder's path in the extraction


@contextlib.contextmanager
def open_input_location(uri: str, s3: S3Options, zip_max_bytes: int,
                        scratch: str | None = None, share: str | None = None,
                        keep: bool = False) -> Iterator[Storage]:
    """The input folder as a Storage. A `.zip` (local or S3) is extracted to a temporary folder;
    if the archive holds exactly one top-level folder, that folder is the input.

    The extraction is removed on exit, unless `share` names it for later steps of the same run
    (e.g. the run id) and `keep` is set and the body succeeded: a later step opening the same zip
    with the same `share` then reuses it, without fetching or extracting again, and removes it
    itself unless it keeps it too. Kept extractions older than a day are swept."""
    if not is_zip_path(uri):
        yield Storage(uri, s3)
        return
    if share is None:
        workdir, folder = tempfile.mkdtemp(prefix="semdedup-zip-", dir=scratch), None
    else:
        root = os.path.join(scratch or tempfile.gettempdir(), SHARED_ZIP_DIR)
        os.makedirs(root, exist_ok=True)
        _sweep_stale_extractions(root)
        workdir = os.path.join(root, hashlib.sha256(f"{share}\0{uri}".encode()).hexdigest()[:32])
        folder = _completed_extraction(workdir)
        if folder is None:
            shutil.rmtree(workdir, ignore_errors=True)  # an interrupted extraction
            os.makedirs(workdir)
        else:
            os.utime(workdir)  # in use: not stale
    kept = False
    try:
        if folder is None:
            folder = _fetch_and_extract(uri, s3, zip_max_bytes, workdir)
            with open(os.path.join(workdir, _COMPLETE), "w") as f:
                f.write(os.path.relpath(folder, workdir))
        storage = Storage(folder)
        storage.uri = uri + "!"  # messages name files inside the zip as `drop.zip!/a.parquet`
        yield storage
        kept = share is not None and keep
    finally:
        if not kept:
            shutil.rmtree(workdir, ignore_errors=True)


def _completed_extraction(workdir: str) -> str | None:
    try:
        with open(os.path.join(workdir, _COMPLETE)) as f:
            return os.path.join(workdir, f.read())
    except FileNotFoundError:
        return None


def _sweep_stale_extractions(root: str) -> None:
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        with contextlib.suppress(FileNotFoundError):
            if now - os.path.getmtime(path) > SHARED_ZIP_MAX_AGE_S:
                shutil.rmtree(path, ignore_errors=True)


def _fetch_and_extract(uri: str, s3: S3Options, zip_max_bytes: int, workdir: str) -> str:
    """Extract the zip at `uri` under `workdir` (an S3 zip is downloaded there first); returns
    the input folder."""
    if is_s3(uri):
        parent, name = posixpath.split(uri)
        source = Storage(parent, s3)
        local_zip = os.path.join(workdir, "input.zip")
        try:
            with source.fs.open_input_stream(source.path(name)) as src, \
                    open(local_zip, "wb") as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
        except FileNotFoundError:
            raise InputError(f"{uri}: no such zip") from None
    else:
        local_zip = str(Path(uri).expanduser())
        if not os.path.isfile(local_zip):
            raise InputError(f"{uri}: no such zip")
    folder = os.path.join(workdir, "extracted")
    os.makedirs(folder)
    extract_zip_safely(local_zip, folder, zip_max_bytes, uri)
    if is_s3(uri):
        os.unlink(local_zip)  # the extraction is all later steps need
    entries = [e for e in os.listdir(folder) if e != MACOS_META]
    if len(entries) == 1 and os.path.isdir(os.path.join(folder, entries[0])):
        folder = os.path.join(folder, entries[0])
    return folder

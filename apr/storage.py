"""Artifact URIs: local directories and `s3://bucket/prefix` (MinIO, SeaweedFS or any S3 API).

An artifact is a directory. It is complete only once its manifest (`_MANIFEST.json`: every
file's size and SHA-256) is written, which happens last; a reader refuses an artifact without
one and checks every file it downloads against it. Remote I/O goes through the `minio` client
(multipart above `PART_SIZE`, retried with backoff). The endpoint and credentials come from
the environment and are never logged:

    S3_ENDPOINT (or AWS_ENDPOINT_URL)   e.g. http://minio.kubeflow:9000 (https:// for TLS)
    S3_CREDENTIALS                      keys (default), iam or anonymous
    keys: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY   (or MINIO_ACCESS_KEY / MINIO_SECRET_KEY)
    iam: the pod's role, as the AWS SDKs find it: a web-identity token (IRSA:
         AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN, AWS_ENDPOINT_URL_STS), the container
         credentials endpoint (EKS Pod Identity) or the instance's metadata
    anonymous: unsigned requests (a public bucket)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, TypeVar
from urllib.parse import urlparse

from apr import atomic
from apr.config import InputError

MANIFEST = "_MANIFEST.json"
PART_SIZE = 16 * 1024 * 1024  # multipart chunk (S3 needs at least 5 MiB)
T = TypeVar("T")


class StorageError(RuntimeError):
    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code  # the S3 error code, when the server answered with one


MISSING = ("NoSuchKey", "NoSuchBucket")  # S3 codes that mean the object is not there
PERMANENT = (*MISSING, "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")  # no retry


class IncompleteArtifact(StorageError):
    """No manifest: the artifact is being written, or its writer died."""


class ChecksumMismatch(StorageError):
    pass


CREDENTIALS = ("keys", "iam", "anonymous")  # S3_CREDENTIALS: how requests are signed


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # host:port
    secure: bool
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    region: str | None = None
    credentials: str = "keys"  # one of CREDENTIALS
    sts_endpoint: str | None = None  # iam with a web-identity token: where to exchange it

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, endpoint: str = "") -> S3Settings:
        """Credentials from `env` (the process environment by default); `endpoint`, when
        given, wins over the environment's (a pipeline parameter, say)."""
        env = dict(os.environ if env is None else env)
        url = (endpoint or env.get("S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL")
               or env.get("MINIO_ENDPOINT"))
        mode = env.get("S3_CREDENTIALS") or "keys"
        if mode not in CREDENTIALS:
            raise InputError(f"S3_CREDENTIALS={mode}: use one of {', '.join(CREDENTIALS)}")
        access = env.get("AWS_ACCESS_KEY_ID") or env.get("MINIO_ACCESS_KEY") or ""
        secret = env.get("AWS_SECRET_ACCESS_KEY") or env.get("MINIO_SECRET_KEY") or ""
        if not url or (mode == "keys" and not (access and secret)):
            raise InputError("s3:// URIs need S3_ENDPOINT, and AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY in the environment (from a Kubernetes "
                             "Secret), or S3_CREDENTIALS=iam (the pod's role) or anonymous")
        parsed = urlparse(url if "://" in url else f"http://{url}")
        keys = (access, secret) if mode == "keys" else ("", "")
        return cls(parsed.netloc, parsed.scheme == "https", *keys,
                   env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"), mode,
                   env.get("AWS_ENDPOINT_URL_STS"))

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def client(self):
        from minio import Minio

        if self.credentials == "iam":
            from minio.credentials import IamAwsProvider

            return Minio(self.endpoint, secure=self.secure, region=self.region,
                         credentials=IamAwsProvider(custom_endpoint=self.sts_endpoint))
        if self.credentials == "anonymous":
            return Minio(self.endpoint, secure=self.secure, region=self.region)
        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                     secure=self.secure, region=self.region)


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def settings_for(uri: str | Path, endpoint: str = "") -> S3Settings | None:
    """The settings an s3:// URI needs (see `S3Settings.from_env`); None for a local path."""
    return S3Settings.from_env(endpoint=endpoint) if is_remote(uri) else None


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's bucket naming rules


def split_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InputError(f"{uri!r} is not an s3://bucket/prefix URI")
    if not _BUCKET.match(parsed.netloc):
        raise InputError(f"{parsed.netloc!r} in {uri!r} is not a bucket name: 3 to 63 lowercase "
                         "letters, digits, '.' and '-', starting and ending with a letter or digit")
    return parsed.netloc, parsed.path.strip("/")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(directory: Path) -> dict:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative != MANIFEST:
            files[relative] = {"size": path.stat().st_size, "sha256": sha256(path)}
    return {"version": 1, "files": files}


def retry(action: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.5) -> T:
    """Retry transient S3 failures (network errors, 5xx) with exponential backoff."""
    from minio.error import S3Error
    from urllib3.exceptions import HTTPError

    for attempt in range(attempts):
        try:
            return action()
        except S3Error as e:
            if e.code in PERMANENT or attempt == attempts - 1:
                raise StorageError(f"{what}: {e.code}: {e.message}", e.code) from e
        except (HTTPError, OSError) as e:
            if attempt == attempts - 1:
                raise StorageError(f"{what}: {e}") from e
        time.sleep(base_delay * 2 ** attempt)
    raise AssertionError("unreachable")


# --- writing ----------------------------------------------------------------------------
def upload(local: str | Path, uri: str | Path, settings: S3Settings | None = None) -> dict:
    """Publish a local directory at `uri`; the manifest goes last. Returns the manifest."""
    local = Path(local)
    if not local.is_dir():
        raise InputError(f"{local} is not a directory")
    manifest = manifest_of(local)
    if not is_remote(uri):
        with atomic.partial_dir(uri, replace=MANIFEST) as partial:
            shutil.copytree(local, partial, ignore=shutil.ignore_patterns(MANIFEST),
                            dirs_exist_ok=True)
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return manifest
    settings = settings or S3Settings.from_env()
    client = settings.client()
    bucket, prefix = split_uri(str(uri))
    if not retry(lambda: client.bucket_exists(bucket), f"bucket {bucket}"):
        retry(lambda: client.make_bucket(bucket), f"create bucket {bucket}")
    key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    retry(lambda: client.remove_object(bucket, key), f"unpublish {uri}")  # incomplete while writing
    for relative in manifest["files"]:
        name = f"{prefix}/{relative}" if prefix else relative
        retry(lambda: client.fput_object(bucket, name, str(local / relative), part_size=PART_SIZE),
              f"upload {relative} to {uri}")
    body = json.dumps(manifest, indent=1).encode()
    retry(lambda: client.put_object(bucket, key, io.BytesIO(body), len(body),
                                    content_type="application/json"), f"publish {uri}")
    return manifest


def remove(uri: str | Path, settings: S3Settings | None = None) -> None:
    """Delete an artifact: its manifest first (so that it stops being complete at once), then
    the files the manifest lists, and nothing else under its prefix. Absent: nothing to do."""
    if not is_complete(uri, settings):
        return
    manifest = read_manifest(uri, settings)
    for relative in manifest["files"]:
        path = PurePosixPath(relative)
        if path.is_absolute() or ".." in path.parts:
            raise StorageError(f"{uri}/{MANIFEST} names {relative!r}, a path outside the "
                               "artifact: refusing to remove it")
    if not is_remote(uri):
        root = Path(uri)
        (root / MANIFEST).unlink()
        for relative in manifest["files"]:
            (root / relative).unlink(missing_ok=True)
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True) + [root]:
            if not any(folder.iterdir()):  # emptied by the removal; anything else stays
                folder.rmdir()
        return
    client = (settings or S3Settings.from_env()).client()
    bucket, prefix = split_uri(str(uri))
    for relative in [MANIFEST, *manifest["files"]]:
        name = f"{prefix}/{relative}" if prefix else relative
        retry(lambda: client.remove_object(bucket, name), f"remove {relative} of {uri}")


# --- reading ----------------------------------------------------------------------------
def read_manifest(uri: str | Path, settings: S3Settings | None = None) -> dict:
    if not is_remote(uri):
        path = Path(uri) / MANIFEST
        if not path.is_file():
            raise IncompleteArtifact(f"{uri} has no {MANIFEST}: it is incomplete or not an artifact")
        return _checked_manifest(path.read_bytes(), uri)
    settings = settings or S3Settings.from_env()
    client = settings.client()
    bucket, prefix = split_uri(str(uri))
    key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    try:
        response = retry(lambda: client.get_object(bucket, key), f"read {uri}/{MANIFEST}")
    except StorageError as e:
        if e.code not in MISSING:  # denied or unreachable is not "absent": say so, never guess
            raise
        raise IncompleteArtifact(f"{uri} has no {MANIFEST}: it is incomplete or not an "
                                 f"artifact ({e})", e.code) from e
    try:
        return _checked_manifest(response.read(), uri)
    finally:
        response.close()
        response.release_conn()


def _checked_manifest(blob: bytes, uri: str | Path) -> dict:
    """A manifest's JSON, once it lists at least one file with its size and checksum."""
    try:
        manifest = json.loads(blob)
    except ValueError as e:
        raise StorageError(f"{uri}/{MANIFEST} is corrupt ({e}): publish the artifact again") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(
            isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
            for f in files.values()):
        raise StorageError(f"{uri}/{MANIFEST} lists no files with their size and sha256: "
                           "publish the artifact again")
    return manifest


def is_complete(uri: str | Path, settings: S3Settings | None = None) -> bool:
    try:
        read_manifest(uri, settings)
        return True
    except IncompleteArtifact:
        return False


def _fetch(client, bucket: str, name: str, target: Path) -> None:
    """One object into `target`, streamed: a GET alone (fget_object adds a HEAD first, which
    a store granting only s3:GetObject, a public bucket say, may refuse)."""
    response = client.get_object(bucket, name)
    try:
        with open(target, "wb") as f:
            for chunk in response.stream(1 << 20):
                f.write(chunk)
    finally:
        response.close()
        response.release_conn()


def download(uri: str | Path, local: str | Path, settings: S3Settings | None = None) -> Path:
    """Fetch a complete artifact into `local` (created whole or not at all), verifying every file."""
    local = Path(local)
    atomic.check_replaceable(local, MANIFEST)  # an earlier download, or nothing
    manifest = read_manifest(uri, settings)
    with atomic.partial_dir(local, replace=MANIFEST) as partial:
        if is_remote(uri):
            settings = settings or S3Settings.from_env()
            client = settings.client()
            bucket, prefix = split_uri(str(uri))
        for relative, expected in manifest["files"].items():
            path = PurePosixPath(relative)
            if path.is_absolute() or ".." in path.parts:
                raise StorageError(f"{uri}/{MANIFEST} names {relative!r}, a path outside the "
                                   "artifact: refusing to write it")
            target = partial / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if is_remote(uri):
                name = f"{prefix}/{relative}" if prefix else relative
                retry(lambda: _fetch(client, bucket, name, target), f"download {relative}")
            else:
                shutil.copyfile(Path(uri) / relative, target)
            if target.stat().st_size != expected["size"] or sha256(target) != expected["sha256"]:
                raise ChecksumMismatch(f"{uri}/{relative} does not match its manifest checksum")
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return local

"""The publish stage: a trained model directory to `<store>/models/<name>/<version>/`.

The store is an `s3://bucket[/prefix]` URI (MinIO, where the Helm chart's init container pulls
from) or a local directory. The model appears complete only when its manifest is written. A
published version is immutable: publishing it again is refused unless `replace` is asked for
(then it is incomplete while the new files go up), so a server pulling `v1` always gets the
model that was first published as `v1`.
"""

from __future__ import annotations

import re
from pathlib import Path

from apr import model as model_lib
from apr import storage
from apr.config import InputError

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def model_uri(store: str, name: str, version: str) -> str:
    for key, value in (("name", name), ("version", version)):
        if not _NAME.match(value):
            raise InputError(f"model {key} {value!r}: use lowercase letters, digits, '.', '_', '-'")
    store = str(store)
    if store.lower().startswith("s3:"):  # never a local folder named `s3:`
        storage.split_uri(store)  # says what is wrong with it: s3://bucket[/prefix]
    elif not store:
        raise InputError("the store is empty: give s3://bucket[/prefix] or a local directory")
    return f"{store.rstrip('/')}/models/{name}/{version}"


def run(model_dir: str | Path, store: str, name: str, version: str,
        settings: storage.S3Settings | None = None, replace: bool = False) -> str:
    model_dir = model_lib.check_directory(model_dir)  # whole files only: never a truncated one
    uri = model_uri(store, name, version)
    if not replace and storage.is_complete(uri, settings):
        raise InputError(f"{uri} is already published and versions are immutable: publish a "
                         "new version, or replace this one on purpose (--replace)")
    storage.upload(model_dir, uri, settings)
    return uri

"""The publish stage: a trained model directory to `<store>/models/<name>/<version>/`.

The store is an `s3://bucket[/prefix]` URI (MinIO, where the Helm chart's init container pulls
from) or a local directory. The model appears complete only when its manifest is written.
"""

from __future__ import annotations

import re
from pathlib import Path

from apr import storage
from apr.config import InputError

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def model_uri(store: str, name: str, version: str) -> str:
    for key, value in (("name", name), ("version", version)):
        if not _NAME.match(value):
            raise InputError(f"model {key} {value!r}: use lowercase letters, digits, '.', '_', '-'")
    return f"{str(store).rstrip('/')}/models/{name}/{version}"


def run(model_dir: str | Path, store: str, name: str, version: str,
        settings: storage.S3Settings | None = None) -> str:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise InputError(f"{model_dir} is not a saved model (config.json, model.safetensors)")
    uri = model_uri(store, name, version)
    storage.upload(model_dir, uri, settings)
    return uri

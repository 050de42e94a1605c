"""Artifact storage against a real S3-compatible server (moto's standalone server) on loopback."""

from __future__ import annotations

import io
import json
import os

import pytest
from conftest import S3_KEYS as KEYS

from apr import storage
from apr.config import InputError
from apr.storage import ChecksumMismatch, IncompleteArtifact, S3Settings


@pytest.fixture
def artifact(tmp_path):
    root = tmp_path / "artifact"
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text(json.dumps({"x": 1}))
    (root / "sub" / "b.txt").write_text("hello\n" * 100)
    (root / "big.bin").write_bytes(os.urandom(storage.PART_SIZE + 3 * 1024 * 1024))  # multipart
    return root


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file() and p.name != storage.MANIFEST}


def test_round_trip_of_a_directory_with_a_multipart_file(s3, artifact, tmp_path):
    manifest = storage.upload(artifact, "s3://artifacts/runs/1/data", s3)
    assert set(manifest["files"]) == {"a.json", "sub/b.txt", "big.bin"}
    assert storage.is_complete("s3://artifacts/runs/1/data", s3)
    got = storage.download("s3://artifacts/runs/1/data", tmp_path / "copy", s3)
    assert files(got) == files(artifact)


def test_an_interrupted_upload_is_not_complete(s3, artifact, tmp_path, monkeypatch):
    from minio import Minio

    storage.upload(artifact, "s3://artifacts/runs/2/data", s3)  # an earlier complete version
    real_put = Minio.fput_object

    def dies_on_big_file(self, bucket, name, path, **kwargs):
        if name.endswith("big.bin"):
            raise OSError("connection reset by peer")
        return real_put(self, bucket, name, path, **kwargs)

    monkeypatch.setattr(Minio, "fput_object", dies_on_big_file)
    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    with pytest.raises(storage.StorageError, match="big.bin"):
        storage.upload(artifact, "s3://artifacts/runs/2/data", s3)
    assert not storage.is_complete("s3://artifacts/runs/2/data", s3)
    with pytest.raises(IncompleteArtifact):
        storage.download("s3://artifacts/runs/2/data", tmp_path / "x", s3)
    assert not (tmp_path / "x").exists()


def test_a_wrong_checksum_is_caught(s3, artifact, tmp_path):
    storage.upload(artifact, "s3://artifacts/runs/3/data", s3)
    client = s3.client()
    body = b"tampered"
    client.put_object("artifacts", "runs/3/data/sub/b.txt", io.BytesIO(body), len(body))
    with pytest.raises(ChecksumMismatch, match="sub/b.txt"):
        storage.download("s3://artifacts/runs/3/data", tmp_path / "copy", s3)
    assert not (tmp_path / "copy").exists()


def test_local_uris_use_the_same_manifest_rules(artifact, tmp_path):
    storage.upload(artifact, tmp_path / "published", None)
    assert storage.is_complete(tmp_path / "published")
    assert files(storage.download(tmp_path / "published", tmp_path / "copy")) == files(artifact)
    assert not storage.is_complete(artifact)


def test_settings_come_from_the_environment_and_hide_secrets():
    s = S3Settings.from_env({"S3_ENDPOINT": "https://minio.example:9000", **KEYS})
    assert (s.endpoint, s.secure) == ("minio.example:9000", True)
    assert "testing-secret-value" not in repr(s) and "testing-access" not in repr(s)
    with pytest.raises(InputError, match="S3_ENDPOINT"):
        S3Settings.from_env({})


def test_an_unreachable_store_is_an_error_not_an_absent_artifact(monkeypatch):
    from conftest import free_port

    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    dead = S3Settings(f"127.0.0.1:{free_port()}", False, "key", "secret", "us-east-1")
    with pytest.raises(storage.StorageError) as caught:  # a resume must not start over
        storage.is_complete("s3://artifacts/runs/1/data", dead)
    assert not isinstance(caught.value, IncompleteArtifact)


def test_a_manifest_naming_a_path_outside_the_artifact_is_refused(artifact, tmp_path):
    published = tmp_path / "published"
    storage.upload(artifact, published, None)
    manifest = json.loads((published / storage.MANIFEST).read_text())
    manifest["files"]["../escaped.txt"] = manifest["files"].pop("a.json")
    (published / storage.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(storage.StorageError, match="outside the artifact"):
        storage.download(published, tmp_path / "copy")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "copy").exists()


def test_pull_into_a_directory_it_did_not_write_is_refused(artifact, tmp_path):
    published = tmp_path / "store" / "models" / "m" / "v1"
    storage.upload(artifact, published)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no _MANIFEST.json"):
        storage.download(published, docs)
    assert [p.name for p in docs.iterdir()] == ["index.md"]
    storage.download(published, tmp_path / "pulled")
    storage.download(published, tmp_path / "pulled")  # an earlier pull is replaced
    assert storage.is_complete(tmp_path / "pulled")


def model_files(directory, value: float):
    """The files `publish` checks (whole safetensors, config, tokenizer), not a real model."""
    import numpy as np
    from safetensors.numpy import save_file

    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "tokenizer.json").write_text("{}")
    save_file({"w": np.full(4, value, dtype=np.float32)}, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("store", ["s3://", "s3:/bucket", "S3://", "s3:bucket", ""])
def test_a_store_that_is_no_s3_uri_is_refused_not_written_as_a_folder(store, tmp_path,
                                                                      monkeypatch):
    """`--store s3://` once wrote a local folder named `s3:` and said it had published."""
    from apr.stages import publish

    model = model_files(tmp_path / "model", 1.0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError):
        publish.run(model, store, "apr", "v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_published_version_is_immutable_unless_replaced_on_purpose(tmp_path, s3):
    """Re-publishing once deleted the manifest first: a killed re-publish left the good
    version unpullable, and versions changed under the servers pulling them."""
    from apr.stages import publish

    first, second = model_files(tmp_path / "first", 1.0), model_files(tmp_path / "second", 2.0)
    weights = {m: (m / "model.safetensors").read_bytes() for m in (first, second)}
    for store in (str(tmp_path / "store"), "s3://apr-immutable"):
        uri = publish.run(first, store, "apr", "v1", s3 if store.startswith("s3") else None)
        settings = s3 if store.startswith("s3") else None
        with pytest.raises(InputError, match="already published"):
            publish.run(second, store, "apr", "v1", settings)
        pulled = storage.download(uri, tmp_path / f"pulled-{len(store)}", settings)
        assert (pulled / "model.safetensors").read_bytes() == weights[first]
        publish.run(second, store, "apr", "v1", settings, replace=True)
        pulled = storage.download(uri, tmp_path / f"replaced-{len(store)}", settings)
        assert (pulled / "model.safetensors").read_bytes() == weights[second]


def test_iam_credentials_come_from_the_pods_identity_endpoint(s3, artifact, tmp_path,
                                                           monkeypatch):
    """EKS Pod Identity: the agent on the node hands out temporary keys for the pod's role
    (a loopback stand-in of the agent here; moto accepts the keys it signs with)."""
    import http.server
    import threading

    asked = []

    class Agent(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            asked.append((self.path, self.headers.get("Authorization")))
            body = json.dumps({"AccessKeyId": "ASIAPODIDENTITY", "SecretAccessKey": "pod-secret",
                               "Token": "pod-session", "Expiration": "2099-01-01T00:00:00Z"})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

    agent = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    token = tmp_path / "eks-pod-identity-token"
    token.write_text("projected-service-account-token")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI",
                       f"http://127.0.0.1:{agent.server_address[1]}/v1/credentials")
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token))
    try:
        iam = S3Settings.from_env({"S3_ENDPOINT": s3.url, "S3_CREDENTIALS": "iam"})
        assert (iam.access_key, iam.secret_key) == ("", "")  # no static keys are held
        storage.upload(artifact, "s3://artifacts/iam/model", iam)
        copy = storage.download("s3://artifacts/iam/model", tmp_path / "copy", iam)
        assert files(copy) == files(artifact)
    finally:
        agent.shutdown()
    assert asked and asked[0] == ("/v1/credentials", "projected-service-account-token")


def test_anonymous_requests_read_a_public_store(s3, artifact, tmp_path):
    storage.upload(artifact, "s3://public/models/m/v1", s3)
    s3.client().set_bucket_policy("public", json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
         "Resource": ["arn:aws:s3:::public", "arn:aws:s3:::public/*"]}]}))
    anonymous = S3Settings.from_env({"S3_ENDPOINT": s3.url, "S3_CREDENTIALS": "anonymous"})
    assert anonymous.client()._provider is None  # unsigned
    assert files(storage.download("s3://public/models/m/v1", tmp_path / "copy", anonymous)) == \
        files(artifact)


@pytest.mark.parametrize("env, says", [
    ({"S3_ENDPOINT": "http://x:9000", "S3_CREDENTIALS": "vault"}, "use one of keys, iam, anonymous"),
    ({"S3_ENDPOINT": "http://x:9000"}, "S3_CREDENTIALS=iam"),  # keys asked for, none given
])
def test_a_credentials_mode_that_cannot_work_is_named(env, says):
    with pytest.raises(InputError, match=says):
        S3Settings.from_env(env)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_remove_deletes_the_artifact_and_nothing_beside_it(where, s3, artifact, tmp_path):
    base = "s3://removal/runs/9" if where == "s3" else str(tmp_path / "store")
    settings = s3 if where == "s3" else None
    storage.upload(artifact, f"{base}/staged", settings)
    storage.upload(artifact, f"{base}/staged-2", settings)  # a sibling sharing the prefix
    storage.remove(f"{base}/staged", settings)
    assert not storage.is_complete(f"{base}/staged", settings)
    assert storage.is_complete(f"{base}/staged-2", settings)
    if where == "s3":
        names = {o.object_name for o in s3.client().list_objects("removal", recursive=True)}
        assert names and all(n.startswith("runs/9/staged-2/") for n in names)
    else:
        assert not (tmp_path / "store" / "staged").exists()
        storage.upload(artifact, f"{base}/staged", settings)
        (tmp_path / "store" / "staged" / "sub" / "notes.txt").write_text("someone else's")
        storage.remove(f"{base}/staged", settings)  # only what the manifest lists goes
        assert [p.name for p in (tmp_path / "store" / "staged").rglob("*") if p.is_file()] == [
            "notes.txt"]
    storage.remove(f"{base}/staged", settings)  # gone already: nothing to do

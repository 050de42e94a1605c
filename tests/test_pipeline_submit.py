"""`apr pipeline submit` against a recording stand-in of the KFP v2beta1 API: the requests
kfp.Client sends must carry typed parameters (the API refuses a string for a number, a flag
or a list), the bearer token, the namespace, and register the pipeline when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ServedApp
from fastapi import FastAPI, Request

from apr import cli
from apr.cluster.pipeline import (
    Submission,
    parameter_types,
    repository_root,
    submit,
    typed_arguments,
)
from apr.config import InputError

PACKAGE = repository_root() / "pipelines" / "apr_pipeline.yaml"
API = "/apis/v2beta1"


def recording_api(existing_pipeline: bool = False) -> tuple[FastAPI, list[dict]]:
    """The endpoints kfp.Client calls to run (and register) a package, answering as KFP's
    API server does and recording each request."""
    app, seen = FastAPI(), []

    @app.middleware("http")
    async def record(request: Request, call_next):
        body = await request.body()
        seen.append({"method": request.method, "path": request.url.path,
                     "query": dict(request.query_params), "body": body,
                     "authorization": request.headers.get("authorization")})
        return await call_next(request)

    @app.get(f"{API}/healthz")
    async def healthz():
        return {"multi_user": False}

    @app.get(f"{API}/experiments")
    async def experiments():
        return {"experiments": []}

    @app.post(f"{API}/experiments")
    async def new_experiment(request: Request):
        return {"experiment_id": "e-1", **(await request.json())}

    @app.get(f"{API}/pipelines")
    async def pipelines():
        found = [{"pipeline_id": "p-old", "display_name": "apr"}] if existing_pipeline else []
        return {"pipelines": found, "total_size": len(found)}

    @app.post(f"{API}/pipelines/upload")
    async def upload(request: Request):
        return {"pipeline_id": "p-new", "display_name": request.query_params.get("name")}

    @app.get(f"{API}/pipelines/{{pipeline_id}}/versions")
    async def versions(pipeline_id: str):
        return {"pipeline_versions": [{"pipeline_version_id": "v-first", "display_name": "apr",
                                       "pipeline_id": pipeline_id}]}

    @app.post(f"{API}/pipelines/upload_version")
    async def upload_version(request: Request):
        return {"pipeline_version_id": "v-new", "display_name": request.query_params.get("name"),
                "pipeline_id": request.query_params.get("pipelineid")}

    @app.post(f"{API}/runs")
    async def run(request: Request):
        return {"run_id": "r-1", **(await request.json())}

    return app, seen


def _run_request(seen: list[dict]) -> dict:
    (request,) = [r for r in seen if r["method"] == "POST" and r["path"] == f"{API}/runs"]
    return json.loads(request["body"])


@pytest.mark.slow
def test_arguments_are_sent_as_the_types_the_pipeline_declares(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no kfp context from the machine
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "secret-token")
    app, seen = recording_api()
    with ServedApp(app) as api:
        assert cli.main(["pipeline", "submit", "--host", api.url, "--run-name", "nightly",
                         "--arg", "preset=gpu-small", "--arg", "model_version=1.0",
                         "--arg", "grpo_timeout_s=3600", "--arg", "replace_model=true",
                         "--arg", "sft_overrides=[max_steps=100, lr=1e-4]"]) == 0
    run = _run_request(seen)
    assert run["display_name"] == "nightly"
    assert run["runtime_config"]["parameters"] == {
        "preset": "gpu-small", "model_version": "1.0", "grpo_timeout_s": 3600,
        "replace_model": True, "sft_overrides": ["max_steps=100", "lr=1e-4"]}
    assert "pipeline_spec" in run  # the package itself, inline
    assert all(r["authorization"] == "Bearer secret-token" for r in seen)
    assert "run r-1 submitted" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True])
def test_register_lists_the_pipeline_and_runs_its_version(existing, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    app, seen = recording_api(existing_pipeline=existing)
    with ServedApp(app) as api:
        assert cli.main(["pipeline", "submit", "--host", api.url, "--register", "apr",
                         "--version", "v7", "--arg", "preset=local"]) == 0
    uploads = [r for r in seen if r["path"].startswith(f"{API}/pipelines/upload")]
    run = _run_request(seen)
    if existing:  # a new version of the listed pipeline
        assert [r["path"] for r in uploads] == [f"{API}/pipelines/upload_version"]
        assert uploads[0]["query"]["name"] == "v7" and uploads[0]["query"]["pipelineid"] == "p-old"
        assert run["pipeline_version_reference"] == {"pipeline_id": "p-old",
                                                     "pipeline_version_id": "v-new"}
    else:  # the pipeline, created with the package as its first version
        assert [r["path"] for r in uploads] == [f"{API}/pipelines/upload"]
        assert uploads[0]["query"]["name"] == "apr"
        assert run["pipeline_version_reference"] == {"pipeline_id": "p-new",
                                                     "pipeline_version_id": "v-first"}
    assert "pipeline_spec" not in run
    assert run["runtime_config"]["parameters"] == {"preset": "local"}


@pytest.mark.parametrize("pair, message", [
    ("grpo_timeout_s=soon", "NUMBER_DOUBLE"),
    ("replace_model=maybe", "BOOLEAN"),
    ("sft_overrides=max_steps=1", "LIST"),
    ("grpo_timeout_s=true", "NUMBER_DOUBLE"),
    ("no_such=1", "no such parameter"),
    ("noequals", "NAME=VALUE"),
])
def test_a_value_of_the_wrong_type_is_refused_before_anything_is_sent(pair, message):
    with pytest.raises(InputError, match=message):
        typed_arguments([pair], parameter_types(PACKAGE))


def test_a_package_that_is_not_a_compiled_pipeline_is_named(tmp_path):
    bad = Path(tmp_path / "p.yaml")
    bad.write_text("hello: [")
    with pytest.raises(InputError, match="not a compiled pipeline"):
        parameter_types(bad)


def test_a_version_without_a_pipeline_to_register_it_under_is_refused():
    with pytest.raises(InputError, match="add --register NAME"):
        submit(Submission(host="http://127.0.0.1:9", version="v7"))

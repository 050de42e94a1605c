"""The APR server: solves, bad input, auth, engine outages, metrics, and a real Prometheus."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from functools import lru_cache

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from apr.countdown.threads import CHILD, PARENT
from apr.decode.engine import STOP, Completion, EngineError
from apr.decode.oracle import OracleEngine
from apr.ports import free_port
from apr.serve.app import create_app
from apr.serve.metrics import ALL, ENGINE_CALL_DURATION, Metrics
from apr.serve.protocol import ServerLimits
from tests.test_runtime import records


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return records(40, seed=5)


@pytest.fixture(scope="module")
def solved(corpus) -> dict:
    return next(r for r in corpus if r["kind"] == "apr" and r["solved"] and r["children"] > 0)


def client_for(engine, **kwargs) -> TestClient:
    return TestClient(create_app(engine, **kwargs))


def test_a_solve_returns_a_verified_solution_and_its_costs(corpus, solved):
    client = client_for(OracleEngine(corpus), limits=ServerLimits(max_tokens=4096))
    answer = client.post("/v1/solve", json={"nums": solved["nums"], "target": solved["target"],
                                            "trace": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["correct"] and body["solution"] and body["failure"] is None
    assert body["children"] == solved["children"]
    assert body["tokens"]["sequential"] < body["tokens"]["total"]
    assert [t["prompt"] for t in body["trace"]] == [t["prompt"] for t in solved["threads"]]
    metrics = client.get("/metrics").text
    assert 'apr_requests_total{mode="apr",outcome="correct"} 1.0' in metrics
    assert "apr_children_per_request_count 1.0" in metrics
    for name in ALL:
        assert name in metrics, name


class Recording:
    """Passes calls through and keeps each call's prompts."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    async def generate(self, prompts, sampling):
        self.calls.append(list(prompts))
        return await self.inner.generate(prompts, sampling)

    async def ready(self):
        return True

    async def close(self):
        pass


def test_engine_call_durations_are_labelled_with_the_role_the_runtime_decodes(corpus, solved):
    engine, metrics = Recording(OracleEngine(corpus)), Metrics()
    client = client_for(engine, metrics=metrics)
    answer = client.post("/v1/solve", json={"nums": solved["nums"], "target": solved["target"],
                                            "trace": True})
    assert answer.status_code == 200, answer.text
    # The calls' roles, told apart by their prompts (a parent segment's prompt is a parent's):
    roles = {t["prompt"]: t["role"] for t in answer.json()["trace"]}
    called = [{roles[p] for p in prompts} for prompts in engine.calls]
    assert all(len(r) == 1 for r in called), called  # no call mixes roles
    parents = sum(r == {PARENT} for r in called)
    children = sum(r == {CHILD} for r in called)
    assert parents >= 2 and children >= 1 and parents + children == len(engine.calls)
    count = f"{ENGINE_CALL_DURATION}_count"
    assert metrics.registry.get_sample_value(count, {"role": PARENT}) == parents
    assert metrics.registry.get_sample_value(count, {"role": CHILD}) == children
    text = client.get("/metrics").text
    assert f'{count}{{role="parent"}} {float(parents)}' in text
    assert f'{count}{{role="child"}} {float(children)}' in text


class Broken:
    """An engine with a bug: every call raises something that is not an EngineError."""

    async def generate(self, prompts, sampling):
        raise KeyError("http://10.0.0.7:30000/generate: slot 7")

    async def ready(self):
        return True

    async def close(self):
        pass


def test_a_handler_failure_is_a_clean_500_with_its_traceback_logged(caplog):
    client = client_for(Broken())
    with caplog.at_level(logging.ERROR, logger="apr.serve.app"):
        answer = client.post("/v1/solve", json={"nums": [1, 2], "target": 3})
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error", "kind": "internal"}
    assert "KeyError" not in answer.text and "10.0.0.7" not in answer.text
    (record,) = [r for r in caplog.records if r.name == "apr.serve.app"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "/v1/solve" in record.getMessage()
    assert "Traceback" in caplog.text and "KeyError" in caplog.text and "slot 7" in caplog.text
    assert 'apr_errors_total{kind="internal"} 1.0' in client.get("/metrics").text
    assert client.get("/healthz").status_code == 200  # and the server lives on


@pytest.mark.parametrize("body, field", [
    ({"nums": [1], "target": 5}, "nums"),
    ({"nums": [1, 2, 3, 4, 5, 6, 7], "target": 5}, "nums"),
    ({"nums": [0, 2], "target": 5}, "nums"),
    ({"nums": [1, 2], "target": -3}, "target"),
    ({"nums": [1, 2], "target": 5, "budget": 0}, "budget"),
    ({"nums": [1, 2], "target": 5, "max_tokens": 4}, "max_tokens"),
    ({"nums": [1, 2], "target": 5, "temperature": 9}, "temperature"),
    ({"nums": "1,2", "target": 5}, "nums"),
    ({"target": 5}, "nums"),
    # strict types: nothing is coerced into a number or a flag it was not
    ({"nums": [1, 2], "target": True}, "target"),
    ({"nums": [1, 2], "target": "5_0"}, "target"),
    ({"nums": [1, 2], "target": 5.5}, "target"),  # 5.0 is a JSON integer, 5.5 is not
    ({"nums": ["3", 2], "target": 5}, "nums"),
    ({"nums": [1, 2], "target": 5, "trace": "yes"}, "trace"),
    # a sampling temperature of almost 0 is a division by almost 0 in the engine
    ({"nums": [1, 2], "target": 5, "temperature": 1e-30}, "temperature"),
    ({"nums": [1, 2], "target": 5, "temprature": 0.5}, "temprature"),
])
def test_bad_input_is_a_4xx_that_names_the_field(corpus, body, field):
    answer = client_for(OracleEngine(corpus)).post("/v1/solve", json=body)
    assert answer.status_code == 422 and field in answer.json()["error"], answer.text


def test_oversized_and_non_json_bodies_are_refused(corpus):
    client = client_for(OracleEngine(corpus), limits=ServerLimits(max_body_bytes=100))
    big = client.post("/v1/solve", content=b"{" + b" " * 500 + b"}",
                      headers={"content-type": "application/json"})
    assert big.status_code == 413
    garbage = client.post("/v1/solve", content=b"{nums", headers={"content-type": "application/json"})
    assert garbage.status_code == 422


def test_bearer_token_is_required_when_configured(corpus, solved):
    client = client_for(OracleEngine(corpus), token="s3cret")
    body = {"nums": solved["nums"], "target": solved["target"]}
    assert client.post("/v1/solve", json=body).status_code == 401
    assert client.post("/v1/solve", json=body, headers={"authorization": "Bearer nope"}).status_code == 401
    ok = client.post("/v1/solve", json=body, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    # the scheme is case-insensitive (RFC 9110)
    assert client.post("/v1/solve", json=body,
                       headers={"authorization": "bearer s3cret"}).status_code == 200
    # checked before the request is read: a stranger learns nothing about the API's fields
    stranger = client.post("/v1/solve", json={"nums": "x"})
    assert stranger.status_code == 401 and "nums" not in stranger.text
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 401, path
    for path in ("/healthz", "/readyz", "/metrics"):  # kubelet's probes, Prometheus
        assert client.get(path).status_code == 200, path


def test_a_chunked_body_over_the_limit_is_refused(corpus):
    """Without a Content-Length the limit once went unchecked (300 MB were read)."""
    client = client_for(OracleEngine(corpus), limits=ServerLimits(max_body_bytes=100))

    def chunks():
        yield b'{"nums": [1, 2], "target": 3, "pad": "'
        for _ in range(50):
            yield b"x" * 100
        yield b'"}'

    answer = client.post("/v1/solve", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and answer.json()["kind"] == "body_too_large"


@pytest.mark.slow
def test_a_half_sent_body_gets_a_408_not_a_held_connection(corpus, solved):
    """A client that sent half its body and stopped once held its connection and task with
    no end."""
    import socket

    from conftest import ServedApp

    app = create_app(OracleEngine(corpus), ServerLimits(body_timeout_s=0.5))
    with ServedApp(app) as served:
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 100\r\n\r\n{\"nums\": [1, 2],")
            started = time.monotonic()
            answer = b""
            while not answer.endswith(b"}") and (chunk := sock.recv(4096)):
                answer += chunk  # headers and body may come in separate packets
            waited = time.monotonic() - started
            answer = answer.decode()
        # whole bodies still work
        whole = {"nums": solved["nums"], "target": solved["target"]}
        assert httpx.post(f"{served.url}/v1/solve", json=whole).is_success
        text = httpx.get(f"{served.url}/metrics").text
    assert answer.startswith("HTTP/1.1 408") and '"body_timeout"' in answer, answer
    assert waited < 4
    assert 'kind="body_timeout"' in text


def test_the_token_file_flag_gives_a_clear_error(tmp_path, capsys):
    from apr import cli

    assert cli.main(["serve", "--engine", "local", "--model", str(tmp_path),
                     "--token-file", str(tmp_path / "missing")]) == 2
    assert "--token-file" in capsys.readouterr().err


class Flaky:
    """An engine that can be switched off and on, like an SGLang container restarting."""

    def __init__(self, inner, reason="connection refused"):
        self.inner, self.up, self.reason = inner, True, reason

    async def generate(self, prompts, sampling):
        if not self.up:
            raise EngineError(self.reason)
        return await self.inner.generate(prompts, sampling)

    async def ready(self):
        return self.up

    async def close(self):
        pass


def test_an_engine_outage_gives_503_and_the_server_recovers(corpus, solved):
    engine = Flaky(OracleEngine(corpus))
    client = client_for(engine)
    body = {"nums": solved["nums"], "target": solved["target"]}
    assert client.post("/v1/solve", json=body).status_code == 200
    engine.up = False
    answer = client.post("/v1/solve", json=body)
    assert answer.status_code == 503 and answer.json()["kind"] == "engine_unavailable"
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    engine.up = True
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/solve", json=body).status_code == 200
    assert 'apr_errors_total{kind="engine_unavailable"} 1.0' in client.get("/metrics").text


def test_an_engine_outage_is_logged_with_its_reason_and_not_told_to_the_client(corpus, solved,
                                                                             caplog):
    reason = "http://10.0.0.7:30000/generate unreachable: ConnectError('refused')"
    engine = Flaky(OracleEngine(corpus), reason)
    engine.up = False

    async def said_ready_a_moment_ago():  # it went down between the check and the request
        return True

    engine.ready = said_ready_a_moment_ago
    client = client_for(engine)
    with caplog.at_level(logging.WARNING, logger="apr.serve.app"):
        answer = client.post("/v1/solve", json={"nums": solved["nums"], "target": solved["target"]})
        del engine.ready  # its own answer again: down
        assert client.get("/readyz").status_code == 503
    assert answer.status_code == 503 and answer.json()["kind"] == "engine_unavailable"
    assert "10.0.0.7" not in answer.text and "ConnectError" not in answer.text
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "apr.serve.app" and r.levelno == logging.WARNING]
    assert any(reason in m and "503" in m for m in warnings), warnings
    assert any("readyz" in m for m in warnings), warnings


class Slow:
    def __init__(self, seconds):
        self.seconds = seconds

    async def generate(self, prompts, sampling):
        await asyncio.sleep(self.seconds)
        raise AssertionError("the timeout should have fired")

    async def ready(self):
        return True

    async def close(self):
        pass


def test_a_solve_over_the_time_limit_is_a_504():
    client = client_for(Slow(5), limits=ServerLimits(request_timeout_s=0.2))
    answer = client.post("/v1/solve", json={"nums": [1, 2], "target": 3})
    assert answer.status_code == 504


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20), lambda children: st.lists(children, max_size=5)
                    | st.dictionaries(st.text(max_size=10), children, max_size=5), max_leaves=20)
BODIES = st.one_of(
    JSON,
    st.fixed_dictionaries({"nums": JSON, "target": JSON}),
    st.fixed_dictionaries({"nums": st.lists(st.integers(), max_size=8), "target": st.integers()},
                          optional={"budget": JSON, "temperature": JSON, "max_tokens": JSON,
                                    "trace": JSON}),
)


@settings(max_examples=150, deadline=None)
@given(body=BODIES)
@pytest.mark.slow
def test_fuzzed_bodies_never_get_a_5xx(body):
    answer = _fuzz_client().post("/v1/solve", json=body)
    assert answer.status_code < 500, (body, answer.text)


class GivesUp:
    """Answers every prompt with a search that finds nothing: any valid problem is solvable
    by the server, so only a client error or a server fault can fail the fuzzing below (the
    oracle knows few problems and would answer the rest with an outage's 503)."""

    async def generate(self, prompts, sampling):
        return [Completion("No solution found.\n", STOP, None, 8, 4) for _ in prompts]

    async def ready(self):
        return True

    async def close(self):
        pass


@lru_cache(maxsize=1)
def _fuzz_client() -> TestClient:
    return client_for(GivesUp(), limits=ServerLimits(max_tokens=512, max_number=99))


# --- a real Prometheus scrapes the server --------------------------------------------------
class Sleepy:
    """Answers every call after a fixed delay, so request latency is known in advance."""

    def __init__(self, inner, seconds):
        self.inner, self.seconds = inner, seconds

    async def generate(self, prompts, sampling):
        await asyncio.sleep(self.seconds)
        return await self.inner.generate(prompts, sampling)

    async def ready(self):
        return True

    async def close(self):
        pass




@pytest.mark.slow
def test_prometheus_scrapes_the_server_and_sees_its_latency(corpus, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("APR_REQUIRE_TOOLS"):
            pytest.fail("Debian's prometheus package is required (APR_REQUIRE_TOOLS=1)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    import uvicorn

    problem = next(r for r in corpus if r["kind"] == "apr")
    spawns = sum(t["role"] == "parent" for t in problem["threads"]) - 1
    calls = 2 * spawns + 1  # a parent call per segment, a children call per spawn
    app = create_app(Sleepy(OracleEngine(corpus), 0.4 / calls))  # about 0.4 s a solve
    port, prom_port = free_port(), free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: apr\n"
                      f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
    prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        for _ in range(6):
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/solve", timeout=30,
                                json={"nums": problem["nums"], "target": problem["target"]})
            assert answer.status_code == 200
        query = ('histogram_quantile(0.5, sum by (le) '
                 '(apr_request_duration_seconds_bucket{job="apr"}))')
        value = None
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                result = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query",
                                   params={"query": query}).json()["data"]["result"]
                count = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={
                    "query": 'sum(apr_request_duration_seconds_count{job="apr"})'}).json()["data"]["result"]
                if result and count and float(count[0]["value"][1]) == 6:
                    value = float(result[0]["value"][1])
                    break
            except (httpx.HTTPError, KeyError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        assert value is not None, "Prometheus never saw the six requests"
        # Every solve took 0.4 s plus a little: all fall in the (0.25, 0.5] bucket, so the
        # median interpolates inside it.
        assert 0.25 < value <= 0.5
    finally:
        prom.terminate()
        prom.wait(timeout=10)
        server.should_exit = True
        thread.join(timeout=10)


class Held(Recording):
    """An engine whose answers wait until the test lets them go."""

    def __init__(self, inner):
        super().__init__(inner)
        self.go = asyncio.Event()

    async def generate(self, prompts, sampling):
        await self.go.wait()
        return await super().generate(prompts, sampling)


@pytest.mark.slow
def test_a_full_server_says_429_and_the_timeout_counts_the_wait_for_a_slot(corpus, solved):
    engine = Held(OracleEngine(corpus))
    app = create_app(engine, ServerLimits(max_concurrency=1, max_queue=1, request_timeout_s=1.0))
    body = {"nums": solved["nums"], "target": solved["target"]}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://apr") as client:
            running = asyncio.create_task(client.post("/v1/solve", json=body))
            await asyncio.sleep(0.1)
            queued = asyncio.create_task(client.post("/v1/solve", json=body))
            await asyncio.sleep(0.1)
            refused = await client.post("/v1/solve", json=body)
            started = time.perf_counter()
            waited = await queued  # never got the slot: its deadline passed while it waited
            waited_s = time.perf_counter() - started
            engine.go.set()
            return refused, waited, waited_s, await running

    refused, waited, waited_s, running = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.json()["kind"] == "overloaded"
    assert refused.headers["retry-after"] == "1"
    assert waited.status_code == 504 and waited_s < 5
    assert running.status_code == 504  # held past its own deadline too


@pytest.mark.slow
def test_sigterm_ends_the_server_even_with_solves_stuck_on_the_engine(tmp_path):
    """SIGTERM with a solve stuck on the engine and one queued behind it once never exited:
    now requests get --shutdown-timeout seconds, then the process ends."""
    import sys

    from conftest import ServedApp
    from fastapi import FastAPI

    stuck = FastAPI()

    @stuck.get("/ready")
    async def ready():
        return {"status": "ok"}

    @stuck.post("/generate")
    async def generate():
        await asyncio.sleep(3600)

    port = free_port()
    with ServedApp(stuck) as engine:
        server = subprocess.Popen(
            [sys.executable, "-m", "apr.cli", "serve", "--engine-url", engine.url, "--port",
             str(port), "--host", "127.0.0.1", "--max-concurrency", "1", "--shutdown-timeout", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)

        def solve():
            try:
                httpx.post(f"{url}/v1/solve", json={"nums": [1, 2], "target": 3}, timeout=30)
            except httpx.HTTPError:  # the server went away under it: expected here
                pass

        clients = [threading.Thread(target=solve, daemon=True) for _ in range(2)]
        for client in clients:
            client.start()
        time.sleep(1.0)  # one solve on the engine, one at the gate
        server.terminate()
        try:
            code = server.wait(timeout=10)
        finally:
            server.kill()
    assert code is not None, server.stderr.read().decode()


@pytest.mark.slow
def test_the_engines_metrics_are_passed_on_without_its_port(corpus):
    """SGLang listens on the pod's loopback; Prometheus reads its metrics through the APR
    server (`/engine/metrics`, open like `/metrics`), never from SGLang's port."""
    from conftest import ServedApp
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    from apr.decode.sglang import SGLangEngine

    sglang = FastAPI()
    exposition = '# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name="m"} 3.0\n'

    @sglang.get("/metrics", response_class=PlainTextResponse)
    async def sglang_metrics():
        return exposition

    with ServedApp(sglang) as engine, client_for(SGLangEngine(engine.url), token="t0ken") as client:
        answer = client.get("/engine/metrics")  # no token: a scrape path
        assert answer.status_code == 200 and answer.text == exposition
        assert answer.headers["content-type"].startswith("text/plain")
    with client_for(SGLangEngine(f"http://127.0.0.1:{free_port()}")) as client:  # nobody there
        down = client.get("/engine/metrics")
    assert down.status_code == 503 and down.json()["kind"] == "engine_unavailable"
    assert client_for(OracleEngine(corpus)).get("/engine/metrics").status_code == 404

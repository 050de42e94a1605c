"""The APR server: `POST /v1/solve` runs the spawn/join loop over an engine (the SGLang
container of the same pod, or any engine by name), with Prometheus metrics.

Bad input gets a 4xx that says what to fix; an engine outage gets a 503 (and `readyz` says
so until the engine answers again); a request that takes too long gets a 504; nothing a
request does brings the server down. Any other failure is a 500 with a clean body and its
traceback in the log. The wire structures are in `apr.serve.protocol`; this module only
translates.

With a token (`apr serve --token-file`, or APR_API_TOKEN) every path but the probes and the
metrics (`/healthz`, `/readyz`, `/metrics`: kubelet and Prometheus) needs
`Authorization: Bearer <token>`, checked before anything else about the request. Bodies are
limited in size however they are sent (Content-Length or chunked).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from apr import __version__
from apr.decode.engine import Engine, EngineError, Sampling
from apr.decode.runtime import ROLE, Budgets, Solve, solve_apr
from apr.serve.metrics import Metrics
from apr.serve.protocol import (
    SOLVE_ERRORS,
    ErrorResponse,
    ServerLimits,
    SolveRequest,
    SolveResponse,
    state_limits,
)

log = logging.getLogger(__name__)


class InstrumentedEngine:
    """Times every engine call for the metrics; otherwise the engine itself."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.weight_version = None

    async def generate(self, prompts: Sequence[str], sampling: Sampling):
        role = ROLE.get()  # said by the runtime, which knows what it decodes
        started = time.perf_counter()
        try:
            return await self.engine.generate(prompts, sampling)
        finally:
            self.metrics.engine_call_duration.labels(role).observe(time.perf_counter() - started)

    async def ready(self) -> bool:
        return await self.engine.ready()

    async def close(self) -> None:
        await self.engine.close()


READY_TIMEOUT_S = 5.0


async def _ready(engine: Engine) -> bool:
    """The engine's own readiness (SGLang's `/ready`), False when it does not answer in time."""
    try:
        return await asyncio.wait_for(engine.ready(), READY_TIMEOUT_S)
    except (asyncio.TimeoutError, EngineError, OSError):
        return False


ENGINE_METRICS = "/engine/metrics"  # the engine's own /metrics, passed on
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", ENGINE_METRICS})  # probes, scraping


def authorized(header: str, token: str) -> bool:
    """`Bearer <token>`, the scheme in any case (RFC 9110), compared in constant time."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())


def _problem(message: str, status: int, kind: str, metrics: Metrics,
             headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.errors.labels(kind).inc()
    return JSONResponse(ErrorResponse(error=message, kind=kind).model_dump(), status_code=status,
                        headers=headers)


class BodyDeadline:
    """A client gets `seconds` to send its whole body, then a 408: a half-sent body held
    open (a slow or hostile client) never keeps a connection and its task forever. Pure
    ASGI, outermost: it sees every message the server receives."""

    def __init__(self, app, seconds: float, answer):
        self.app, self.seconds, self.answer = app, seconds, answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.seconds
        state = {"body_done": False, "timed_out": False, "answered": False}

        async def timed_receive():
            if state["body_done"]:
                return await receive()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                state["timed_out"] = True
                return {"type": "http.disconnect"}  # the app stops reading; the 408 answers
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def quiet_send(message):
            if not state["timed_out"]:
                state["answered"] = True
                await send(message)

        await self.app(scope, timed_receive, quiet_send)
        if state["timed_out"] and not state["answered"]:
            await self.answer()(scope, receive, send)


def create_app(engine: Engine, limits: ServerLimits = ServerLimits(), token: str | None = None,
               engine_name: str = "engine", metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    engine = InstrumentedEngine(engine, metrics)
    gate = asyncio.Semaphore(limits.max_concurrency)
    waiting = {"n": 0}  # solves waiting for a slot of `gate`
    app = FastAPI(title="APR server", version=__version__,
                  description="Adaptive Parallel Reasoning on Countdown: spawn/join decoding.")
    app.state.metrics = metrics
    metrics.build_info.labels(__version__, engine_name).set(1)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None and request.url.path not in OPEN_PATHS and \
                not authorized(request.headers.get("authorization", ""), token):
            return _problem("missing or wrong bearer token", 401, "unauthorized", metrics)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return _problem(f"request body over {limits.max_body_bytes} bytes", 413,
                            "body_too_large", metrics)
        try:
            return await call_next(request)
        except Exception:  # noqa: BLE001 - the server must outlive any request
            # The traceback goes to the log, never to the client (no type names, no URLs).
            log.exception("%s %s failed", request.method, request.url.path)
            return _problem("internal error", 500, "internal", metrics)

    # a chunked body has no Content-Length: this counts what arrives
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=limits.max_body_bytes)
    app.add_middleware(BodyDeadline, seconds=limits.body_timeout_s, answer=lambda: _problem(
        f"the request body did not arrive within {limits.body_timeout_s:g} s", 408,
        "body_timeout", metrics))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException):
        if error.status_code == 413:
            return _problem(f"request body over {limits.max_body_bytes} bytes", 413,
                            "body_too_large", metrics)
        kind = "not_found" if error.status_code == 404 else "bad_request"
        # kept: a 405's `Allow` (RFC 9110), a 401's `WWW-Authenticate`
        return _problem(str(error.detail), error.status_code, kind, metrics,
                        headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError):
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: "
                           f"{e['msg']}" for e in error.errors())
        return _problem(f"invalid request: {fields}", 422, "bad_request", metrics)

    @app.post("/v1/solve", response_model=SolveResponse, responses={
        status: {"model": ErrorResponse, "description": text}
        for status, text in SOLVE_ERRORS.items()})
    async def solve(body: SolveRequest):
        problem = body.problem(limits)
        if problem is not None:
            return _problem(problem, 422, "bad_request", metrics)
        budgets = Budgets(context=body.max_tokens or limits.max_tokens,
                          sub_call_budget=body.budget or 0)
        if waiting["n"] >= limits.max_queue:
            return _problem(f"the server is at capacity ({limits.max_concurrency} solves and "
                            f"{limits.max_queue} waiting); retry later", 429, "overloaded",
                            metrics, headers={"Retry-After": "1"})
        started = time.perf_counter()

        async def gated() -> Solve:
            waiting["n"] += 1
            try:
                await gate.acquire()
            finally:
                waiting["n"] -= 1
            try:
                return await solve_apr(engine, body.nums, body.target, budgets, body.temperature)
            finally:
                gate.release()

        metrics.in_flight.inc()
        try:
            # A paused SGLang (a weight update) holds new requests until it continues, and
            # aborts those in flight: say 503 now rather than a 504 later.
            if not await _ready(engine):
                raise EngineError("the engine is not ready")
            # the time waiting for a slot counts: a client's deadline does not care why
            result = await asyncio.wait_for(gated(), limits.request_timeout_s)
        except EngineError as e:
            metrics.engine_up.set(0)
            log.warning("engine unavailable, answering 503: %s", e)  # the reason stays here
            return _problem("the engine is unavailable; try again later", 503,
                            "engine_unavailable", metrics)
        except asyncio.TimeoutError:
            log.warning("a solve took over %s s, answering 504", limits.request_timeout_s)
            return _problem(f"the solve took over {limits.request_timeout_s} s", 504, "timeout",
                            metrics)
        finally:
            metrics.in_flight.dec()
        latency = time.perf_counter() - started
        outcome = "correct" if result.correct else "incorrect"
        metrics.engine_up.set(1)
        metrics.request_duration.labels("apr", outcome).observe(latency)
        metrics.requests.labels("apr", outcome).inc()
        metrics.children.observe(result.children)
        metrics.request_tokens.labels("total").observe(result.tokens_total)
        metrics.request_tokens.labels("sequential").observe(result.tokens_sequential)
        metrics.generated_tokens.inc(result.tokens_generated)
        return SolveResponse.of(result, latency, body.trace)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    readiness = {"ok": True}  # what readyz said last: a change is logged, not every probe

    @app.get("/readyz")
    async def readyz():
        reason = "it answered not ready"
        try:
            ok = await asyncio.wait_for(engine.ready(), 5.0)
        except (asyncio.TimeoutError, EngineError, OSError) as e:
            ok, reason = False, str(e) or type(e).__name__
        if ok != readiness["ok"]:
            if ok:
                log.info("the engine is ready again")
            else:
                log.warning("the engine is not ready, readyz answers 503: %s", reason)
            readiness["ok"] = ok
        metrics.engine_up.set(1 if ok else 0)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(ENGINE_METRICS, responses={
        200: {"content": {"text/plain": {}}, "description": "the engine's Prometheus metrics"},
        404: {"model": ErrorResponse, "description": "the engine has no metrics of its own"},
        503: {"model": ErrorResponse, "description": "the engine's metrics are unavailable"}})
    async def engine_metrics():
        """SGLang's metrics through this server: SGLang listens on the pod's loopback only
        (its weight-update API is not for the network), and Prometheus scrapes them here."""
        fetch = getattr(engine.engine, "metrics", None)
        if fetch is None:
            return _problem(f"the {engine_name} engine has no metrics of its own", 404,
                            "not_found", metrics)
        try:
            status, content_type, text = await fetch()
        except EngineError as e:
            log.warning("engine metrics unavailable: %s", e)
            return _problem("the engine's metrics are unavailable", 503, "engine_unavailable",
                            metrics)
        if status != 200:
            return _problem(f"the engine answered {status} for its metrics (is SGLang started "
                            "with --enable-metrics?)", 503, "engine_unavailable", metrics)
        return Response(text, media_type=content_type)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = state_limits(FastAPI.openapi(app), limits)
        return app.openapi_schema

    app.openapi = openapi
    return app


def serve(engine_name: str, engine_url: str = "", model: str | None = None,
          host: str = "0.0.0.0", port: int = 8000, limits: ServerLimits = ServerLimits(),
          token: str | None = None, shutdown_timeout_s: float = 25.0) -> None:
    import uvicorn

    if engine_name == "sglang":
        from apr.decode.sglang import SGLangEngine

        engine = SGLangEngine(engine_url, timeout_s=limits.request_timeout_s)
    else:
        from apr.decode.local import LocalEngine

        engine = LocalEngine(model)
    # Uvicorn configures no logging of its own: its loggers reach the handlers and level the
    # caller (`apr --log-level`) set.
    # After SIGTERM, requests in flight or queued get `shutdown_timeout_s`, then are cancelled:
    # the process always exits (a stuck engine once kept it up until SIGKILL).
    uvicorn.run(create_app(engine, limits, token, engine_name), host=host, port=port,
                log_config=None, log_level=None, timeout_graceful_shutdown=shutdown_timeout_s)

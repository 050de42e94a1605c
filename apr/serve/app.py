"""The APR server: `POST /v1/solve` runs the spawn/join loop over an engine (the SGLang
container of the same pod, or any engine by name), with Prometheus metrics.

Bad input gets a 4xx that says what to fix; an engine outage gets a 503 (and `readyz` says
so until the engine answers again); a request that takes too long gets a 504; nothing a
request does brings the server down.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, field_validator

from apr import __version__
from apr.decode.engine import Engine, EngineError, Sampling
from apr.decode.runtime import ROLE, Budgets, solve_apr
from apr.serve.metrics import Metrics


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; anything outside is a 4xx naming the field."""

    max_numbers: int = 6
    max_number: int = 10_000
    max_target: int = 1_000_000
    max_budget: int = 64  # `Sub Call Budget` conditioning
    max_tokens: int = 4096  # a thread's context window
    max_concurrency: int = 64  # solves decoded at once (they share engine batches)
    request_timeout_s: float = 120.0
    max_body_bytes: int = 16 * 1024


class SolveRequest(BaseModel):
    nums: list[int] = Field(description="the starting numbers (2 to 6 of them)")
    target: int = Field(description="the number to reach")
    budget: int | None = Field(default=None, description="ask for at most N child threads "
                               "(`Sub Call Budget: N `); the model must have been trained with it")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 decodes greedily")
    max_tokens: int | None = Field(default=None, description="context window of each thread")
    trace: bool = Field(default=False, description="return every thread's prompt and text")

    @field_validator("nums")
    @classmethod
    def _two_or_more(cls, nums: list[int]) -> list[int]:
        if len(nums) < 2:
            raise ValueError("give at least 2 numbers")
        return nums


class SolveResponse(BaseModel):
    solution: list[str] | None
    correct: bool
    failure: str | None
    threads: int
    children: int
    tokens: dict[str, int]
    latency_s: float
    trace: list[dict] | None = None


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


def _problem(message: str, status: int, kind: str, metrics: Metrics) -> JSONResponse:
    metrics.errors.labels(kind).inc()
    return JSONResponse({"error": message, "kind": kind}, status_code=status)


def create_app(engine: Engine, limits: ServerLimits = ServerLimits(), token: str | None = None,
               engine_name: str = "engine", metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    engine = InstrumentedEngine(engine, metrics)
    gate = asyncio.Semaphore(limits.max_concurrency)
    app = FastAPI(title="APR server", version=__version__,
                  description="Adaptive Parallel Reasoning on Countdown: spawn/join decoding.")
    app.state.metrics = metrics
    metrics.build_info.labels(__version__, engine_name).set(1)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return _problem(f"request body over {limits.max_body_bytes} bytes", 413,
                            "body_too_large", metrics)
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 - the server must outlive any request
            return _problem(f"internal error: {type(e).__name__}", 500, "internal", metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError):
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: "
                           f"{e['msg']}" for e in error.errors())
        return _problem(f"invalid request: {fields}", 422, "bad_request", metrics)

    def check(body: SolveRequest) -> str | None:
        if len(body.nums) > limits.max_numbers:
            return f"nums: at most {limits.max_numbers} numbers"
        if any(n < 1 or n > limits.max_number for n in body.nums):
            return f"nums: every number must be in 1..{limits.max_number}"
        if not 1 <= body.target <= limits.max_target:
            return f"target: must be in 1..{limits.max_target}"
        if body.budget is not None and not 1 <= body.budget <= limits.max_budget:
            return f"budget: must be in 1..{limits.max_budget}"
        if body.max_tokens is not None and not 16 <= body.max_tokens <= limits.max_tokens:
            return f"max_tokens: must be in 16..{limits.max_tokens}"
        return None

    @app.post("/v1/solve", response_model=SolveResponse)
    async def solve(body: SolveRequest, request: Request):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _problem("missing or wrong bearer token", 401, "unauthorized", metrics)
        problem = check(body)
        if problem is not None:
            return _problem(problem, 422, "bad_request", metrics)
        budgets = Budgets(context=body.max_tokens or limits.max_tokens,
                          sub_call_budget=body.budget or 0)
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            async with gate:
                result = await asyncio.wait_for(
                    solve_apr(engine, body.nums, body.target, budgets, body.temperature),
                    limits.request_timeout_s)
        except EngineError as e:
            metrics.engine_up.set(0)
            return _problem(f"the engine is unavailable: {e}"[:500], 503, "engine_unavailable",
                            metrics)
        except asyncio.TimeoutError:
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
        return SolveResponse(
            solution=result.solution, correct=result.correct, failure=result.failure,
            threads=len(result.threads), children=result.children,
            tokens={"total": result.tokens_total, "sequential": result.tokens_sequential,
                    "generated": result.tokens_generated,
                    "longest_context": result.longest_context},
            latency_s=round(latency, 4),
            trace=[{"role": t.role, "prompt": t.prompt, "text": t.text, "spawn": t.spawn,
                    "index": t.index} for t in result.threads] if body.trace else None)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        try:
            ok = await asyncio.wait_for(engine.ready(), 5.0)
        except (asyncio.TimeoutError, EngineError, OSError):
            ok = False
        metrics.engine_up.set(1 if ok else 0)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(engine_name: str, engine_url: str = "", model: str | None = None,
          host: str = "0.0.0.0", port: int = 8000, limits: ServerLimits = ServerLimits(),
          token: str | None = None) -> None:
    import uvicorn

    if engine_name == "sglang":
        from apr.decode.sglang import SGLangEngine

        engine = SGLangEngine(engine_url, timeout_s=limits.request_timeout_s)
    else:
        from apr.decode.local import LocalEngine

        engine = LocalEngine(model)
    uvicorn.run(create_app(engine, limits, token, engine_name), host=host, port=port,
                log_level="warning")

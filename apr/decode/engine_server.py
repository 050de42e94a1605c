"""`apr engine serve`: SGLang's native HTTP subset over the local engine.

It lets the sidecar topology (a separate process, HTTP, weight reloads from disk) run on any
machine, and the `sglang` client is tested against it. Wire names come from
`apr.decode.sglang`; this module only translates. A failure is a 500 with a clean body and
its traceback in the log.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import replace
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from safetensors import SafetensorError

from apr.decode.engine import ABORT, Completion, Engine, Sampling
from apr.decode.sglang import (
    CONTINUE_GENERATION,
    FLUSH_CACHE,
    GENERATE,
    GREEDY_BELOW,
    HEALTH,
    HEALTH_GENERATE,
    MODEL_INFO,
    MODEL_INFO_OLD,
    PAUSE_GENERATION,
    READY,
    SAMPLING_KEYS,
    UPDATE_WEIGHTS_FROM_DISK,
    completion_json,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default, kept so clients see the same behaviour
ABORTED = "Abort in waiting queue"  # SGLang's message for a request ended by a pause


class BadRequest(ValueError):
    pass


def sampling_from_json(params: dict[str, Any] | None) -> Sampling:
    """Read `sampling_params` the way SGLang does: unknown keys are a 400."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(SAMPLING_KEYS))
    if unknown:
        raise BadRequest(f"unknown sampling_params {unknown}: this server accepts {list(SAMPLING_KEYS)}")
    stop = params.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    try:
        limit = params.get("max_new_tokens")
        sampling = Sampling(max_new_tokens=DEFAULT_MAX_NEW_TOKENS if limit is None else int(limit),
                            temperature=float(params.get("temperature", 1.0)),
                            top_p=float(params.get("top_p", 1.0)), stop=tuple(map(str, stop)))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"bad sampling_params: {e}") from e
    if (sampling.max_new_tokens < 0 or not sampling.temperature >= 0
            or not math.isfinite(sampling.temperature) or not 0 < sampling.top_p <= 1):
        raise BadRequest("max_new_tokens and temperature must be >= 0 (temperature finite), "
                         "top_p in (0, 1]")
    if sampling.temperature < GREEDY_BELOW:  # as SGLang: greedy, never a division by ~0
        sampling = replace(sampling, temperature=0.0)
    return sampling


async def client_gone(request: Request) -> None:
    """Return once the client has disconnected. Its body was read, so the next message the
    server can receive for this request is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, model_path: str, served_name: str = "apr") -> FastAPI:
    """The app; its pause, readiness, health and model-info behaviour follow SGLang's (the
    same behaviour suite runs against both: tests/test_sglang.py)."""
    app = FastAPI(title="apr engine (SGLang-compatible subset)")
    # `aborted` is replaced at each pause: requests in flight hold the one to watch
    state = {"resumed": asyncio.Event(), "aborted": asyncio.Event(),
             "model_path": model_path, "served_name": served_name, "in_flight": 0}
    state["resumed"].set()
    health_timeout_s = float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", 20))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception:  # noqa: BLE001 - the server must outlive any request
            # The traceback goes to the log, never to the client (no type names, no paths).
            log.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse({"error": "internal error", "kind": "internal"}, status_code=500)

    async def decode(prompts: list[str], sampling: Sampling,
                     request: Request | None = None) -> list[Completion]:
        """The engine's answer, or, when a pause in "abort" mode comes first, SGLang's: each
        item ends with finish reason abort (the batch already decoding is dropped). A client
        that goes away takes its rows out of the batch (as SGLang aborts its request)."""
        await state["resumed"].wait()  # /pause_generation holds new work until continued
        aborted = state["aborted"]
        work = asyncio.ensure_future(engine.generate(prompts, sampling))
        stop = asyncio.ensure_future(aborted.wait())
        gone = asyncio.ensure_future(client_gone(request)) if request else stop
        state["in_flight"] += 1
        try:
            await asyncio.wait({work, stop, gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the request itself was cancelled: its work with it
            work.cancel()
            raise
        finally:
            state["in_flight"] -= 1
            stop.cancel()
            gone.cancel()
        if work.done():
            return work.result()
        work.cancel()
        version = getattr(engine, "weight_version", None)
        return [Completion("", ABORT, None, 0, 0, version, meta={"message": ABORTED})
                for _ in prompts]

    @app.post(GENERATE)
    async def generate(request: Request):
        try:
            body = await request.json()
            text = body["text"]
            sampling = sampling_from_json(body.get("sampling_params"))
            logprobs = bool(body.get("return_logprob", False))
        except (KeyError, TypeError, ValueError) as e:
            return JSONResponse({"error": f"bad /generate request: {e}"}, status_code=400)
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            return JSONResponse({"error": "text must be a string or a list of strings"},
                                status_code=400)
        started = time.perf_counter()
        completions = await decode(prompts, replace(sampling, logprobs=logprobs), request)
        latency = time.perf_counter() - started
        items = []
        for c in completions:
            item = completion_json(c, logprobs)
            item["meta_info"]["e2e_latency"] = latency
            items.append(item)
        return items[0] if isinstance(text, str) else items

    async def health_generate():
        """SGLang's health check: a server decoding requests is healthy; an idle one must
        generate a greedy token in time (a paused one cannot: 503 after the timeout)."""
        if state["in_flight"]:
            return Response(status_code=200)
        try:
            await asyncio.wait_for(decode(["\n"], Sampling(max_new_tokens=1, temperature=0.0)),
                                   health_timeout_s)
        except asyncio.TimeoutError:
            return Response(status_code=503)
        except Exception:  # noqa: BLE001 - an engine that cannot generate is unhealthy
            log.exception("the health check could not generate")
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get(HEALTH)
    async def health():
        if os.environ.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "true").lower() == "false":
            return Response(status_code=200)
        return await health_generate()

    app.get(HEALTH_GENERATE)(health_generate)

    @app.get(READY)
    async def ready():
        up = state["resumed"].is_set() and await engine.ready()  # 503 while paused
        return Response(status_code=200 if up else 503)

    @app.get(MODEL_INFO)
    @app.get(MODEL_INFO_OLD)
    async def model_info():
        return {"model_path": state["model_path"], "served_model_name": state["served_name"],
                "tokenizer_path": state["model_path"], "is_generation": True,
                "weight_version": getattr(engine, "weight_version", None)}

    @app.api_route(FLUSH_CACHE, methods=["GET", "POST"])
    async def flush_cache():
        return Response(content="Cache flushed.\n", status_code=200)

    @app.post(PAUSE_GENERATION)
    async def pause(body: dict = Body(default={})):
        # New work waits. "abort" (SGLang's default) ends the requests in flight; the other
        # modes ("retract", "in_place") hold them in SGLang: here they finish.
        state["resumed"].clear()
        if body.get("mode", "abort") == "abort":
            state["aborted"].set()
            state["aborted"] = asyncio.Event()
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post(CONTINUE_GENERATION)
    async def resume(_: dict = Body(default={})):
        state["resumed"].set()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.post(UPDATE_WEIGHTS_FROM_DISK)
    async def update_weights(body: dict = Body(...)):
        load = getattr(engine, "load_weights", None)
        if load is None or "model_path" not in body:
            return JSONResponse({"success": False, "message": "need model_path (and an engine "
                                 "that loads weights)", "num_paused_requests": 0}, status_code=400)
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, load, body["model_path"], body.get("weight_version"))
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # the caller's files
            log.warning("weight update from %s failed: %s", body["model_path"], e)
            return JSONResponse({"success": False, "message": str(e), "num_paused_requests": 0},
                                status_code=400)
        # SGLang answers under the new path from now on, in both names
        state["model_path"] = state["served_name"] = body["model_path"]
        log.info("loaded weights from %s (version %s)", body["model_path"],
                 body.get("weight_version"))
        return {"success": True, "message": "Succeeded to update model weights.",
                "num_paused_requests": 0}

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 30000, device: str = "auto",
          max_batch: int = 64, weight_version: str = "default", batching: str = "auto",
          shutdown_timeout_s: float = 25.0) -> None:
    import uvicorn

    from apr.decode.local import LocalEngine

    engine = LocalEngine(model_dir, device=device, max_batch=max_batch, batching=batching)
    engine.weight_version = weight_version
    # Uvicorn configures no logging of its own: its loggers reach the handlers and level the
    # caller (`apr --log-level`) set.
    uvicorn.run(create_app(engine, model_dir), host=host, port=port, log_config=None,
                log_level=None, timeout_graceful_shutdown=shutdown_timeout_s)

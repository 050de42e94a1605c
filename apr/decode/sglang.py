"""Client of SGLang's native HTTP API, and the single source of truth for its wire format.

Checked against SGLang 0.5.23's own source: `srt/entrypoints/http_server.py` (routes),
`srt/sampling/sampling_params.py` (sampling fields; `max_new_tokens` defaults to 128, unknown
keys are rejected), `srt/managers/schedule_batch.py` (finish reasons: `{"type": "stop",
"matched": str | token id}`, `{"type": "length", "length": n}`, `{"type": "abort",
"message": ...}`), `srt/managers/tokenizer_manager.py` (`meta_info`: `prompt_tokens`,
`completion_tokens`, `e2e_latency`, `weight_version`) and `srt/managers/io_struct.py`
(`UpdateWeightFromDiskReqInput`: `model_path`, `weight_version`, ...; `GenerateReqInput`:
the top-level `return_logprob`, which adds `meta_info.output_token_logprobs`, a list of
`[logprob, token_id, text-or-null]`, beside each item's `output_ids`). `apr.decode.engine_server`
speaks the same subset, built from the names below.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

from apr.decode.engine import ABORT, LENGTH, STOP, Completion, EngineError, Sampling

SGLANG_VERSION = "0.5.23"

# Routes
GENERATE = "/generate"
METRICS = "/metrics"
HEALTH = "/health"
HEALTH_GENERATE = "/health_generate"
READY = "/ready"
MODEL_INFO = "/model_info"
MODEL_INFO_OLD = "/get_model_info"  # before /model_info existed
FLUSH_CACHE = "/flush_cache"
PAUSE_GENERATION = "/pause_generation"
CONTINUE_GENERATION = "/continue_generation"
UPDATE_WEIGHTS_FROM_DISK = "/update_weights_from_disk"

# SGLang decodes greedily below this temperature (`sampling_params.py`: top_k = 1).
GREEDY_BELOW = 1e-6

# The sampling_params keys this project sends (all of them, every time: SGLang's
# max_new_tokens default of 128 would silently cut threads).
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "stop", "skip_special_tokens",
                 "no_stop_trim")


def generate_payload(prompts: Sequence[str], sampling: Sampling) -> dict[str, Any]:
    """The body of `POST /generate` for a batch: `text` is a list, one output per item."""
    payload = {
        "text": list(prompts),
        "sampling_params": {
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stop": list(sampling.stop),
            "skip_special_tokens": True,
            "no_stop_trim": True,  # keep a matched stop string in the text
        },
    }
    if sampling.logprobs:
        payload["return_logprob"] = True
    return payload


def finish_reason_json(completion: Completion) -> dict[str, Any]:
    if completion.finish_reason == LENGTH:
        return {"type": "length", "length": completion.completion_tokens}
    if completion.finish_reason == ABORT:
        return {"type": "abort", "message": completion.meta.get("message", "Aborted")}
    return {"type": "stop", "matched": completion.matched if completion.matched is not None
            else completion.meta.get("eos_token_id")}


def completion_json(completion: Completion, logprobs: bool = False) -> dict[str, Any]:
    """One item of a `/generate` response."""
    meta = {
        "finish_reason": finish_reason_json(completion),
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "e2e_latency": completion.meta.get("e2e_latency", 0.0),
        "weight_version": completion.weight_version,
    }
    if logprobs:
        meta["output_token_logprobs"] = [[lp, token, None] for lp, token in
                                         zip(completion.logprobs, completion.token_ids)]
    return {"text": completion.text, "output_ids": list(completion.token_ids), "meta_info": meta}


def parse_completion(item: dict[str, Any]) -> Completion:
    """One item of a `/generate` response, back into a Completion."""
    try:
        meta = item["meta_info"]
        reason = meta["finish_reason"] or {}
        kind = reason.get("type")
        matched = reason.get("matched") if kind == STOP else None
        token_ids = tuple(int(t) for t in item.get("output_ids") or ())
        logprobs = tuple(float(entry[0]) for entry in meta.get("output_token_logprobs") or ())
        if logprobs and not token_ids:  # each entry names its token too
            token_ids = tuple(int(entry[1]) for entry in meta["output_token_logprobs"])
        return Completion(
            text=item["text"],
            finish_reason={"stop": STOP, "length": LENGTH}.get(kind, ABORT),
            matched=matched if isinstance(matched, str) else None,
            prompt_tokens=int(meta.get("prompt_tokens", 0)),  # an abort may lack it
            completion_tokens=int(meta["completion_tokens"]),
            weight_version=meta.get("weight_version"),
            meta={"e2e_latency": meta.get("e2e_latency"),
                  "message": reason.get("message") if kind == "abort" else None},
            token_ids=token_ids,
            logprobs=logprobs,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise EngineError(f"malformed /generate response item: {item!r:.200}") from e


class SGLangEngine:
    """The `sglang` engine: one HTTP request per batch to an SGLang (or `apr engine serve`)
    server, which batches concurrent requests itself."""

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        import httpx

        self.base_url = base_url.rstrip("/")
        # uvicorn (SGLang's server) closes idle keep-alive connections after 5 s, httpx's own
        # default; dropping ours sooner keeps a request from racing the server's close.
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s,
                                         limits=httpx.Limits(keepalive_expiry=2.0))

    async def _post(self, path: str, body: dict):
        """POST, once more on a fresh connection when a pooled one turns out closed (a
        trainer step longer than the keep-alive met the server's close)."""
        import httpx

        for attempt in (1, 2):
            try:
                return await self._client.post(path, json=body)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as e:
                if attempt == 2:
                    raise EngineError(f"{self.base_url}{path} unreachable: {e!r}") from e
            except httpx.HTTPError as e:
                raise EngineError(f"{self.base_url}{path} unreachable: {e!r}") from e

    async def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[Completion]:
        if not prompts:
            return []
        response = await self._post(GENERATE, generate_payload(prompts, sampling))
        if response.status_code != 200:
            raise EngineError(f"{self.base_url}{GENERATE} answered {response.status_code}: "
                              f"{response.text[:300]}")
        body = response.json()
        items = body if isinstance(body, list) else [body]
        if len(items) != len(prompts):
            raise EngineError(f"{GENERATE} returned {len(items)} outputs for {len(prompts)} prompts")
        return [parse_completion(item) for item in items]

    async def _get(self, path: str) -> int:
        import httpx

        try:
            return (await self._client.get(path)).status_code
        except httpx.HTTPError:
            return 0

    async def ready(self) -> bool:
        """`/ready` (503 while paused or unhealthy); `/health` only on a server without it:
        SGLang's `/health` generates a token, and a paused server holds it for 20 s."""
        status = await self._get(READY)
        if status == 404:
            return await self._get(HEALTH) == 200
        return status == 200

    async def model_info(self) -> dict:
        for path in (MODEL_INFO, MODEL_INFO_OLD):
            response = await self._client.get(path)
            if response.status_code == 200:
                return response.json()
        raise EngineError(f"{self.base_url} serves neither {MODEL_INFO} nor {MODEL_INFO_OLD}")

    async def metrics(self) -> tuple[int, str, str]:
        """The server's Prometheus exposition (`--enable-metrics`): status, content type, text.
        The APR server passes it on, so SGLang's port need not be reachable by Prometheus."""
        import httpx

        try:
            response = await self._client.get(METRICS, timeout=10.0)
        except httpx.HTTPError as e:
            raise EngineError(f"{self.base_url}{METRICS} unreachable: {e!r}") from e
        return (response.status_code, response.headers.get("content-type", "text/plain"),
                response.text)

    async def flush_cache(self) -> None:
        await self._post(FLUSH_CACHE, {})

    async def update_weights_from_disk(self, model_path: str, weight_version: str) -> dict:
        """SGLang's recommended order: pause, update (checking `success`), continue.

        "abort" (SGLang's default mode, said outright): a request still running would be
        ended, never finished on other weights than it started with. The GRPO loop pauses
        between steps, when nothing is in flight.
        """
        await self._post(PAUSE_GENERATION, {"mode": "abort"})
        try:
            response = await self._post(UPDATE_WEIGHTS_FROM_DISK, {
                "model_path": model_path, "weight_version": weight_version})
            try:
                body = response.json()
            except ValueError:
                body = {"success": False, "message": response.text[:300]}
            if response.status_code != 200 or not body.get("success"):
                raise EngineError(f"weight update to {model_path} rejected: {body}")
        except BaseException:
            with contextlib.suppress(Exception):  # the update's error is the one to report
                await self._post(CONTINUE_GENERATION, {})
            raise
        await self._post(CONTINUE_GENERATION, {})
        return body

    async def close(self) -> None:
        await self._client.aclose()

"""Every request and response structure of the APR server, and the limits a request must
keep: the wire contract of `POST /v1/solve` in one place. `apr.serve.app` only translates
between HTTP and these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from apr.decode.runtime import Solve


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; anything outside is a 4xx naming the field."""

    max_numbers: int = 6
    max_number: int = 10_000
    max_target: int = 1_000_000
    max_budget: int = 64  # `Sub Call Budget` conditioning
    max_tokens: int = 4096  # a thread's context window
    max_concurrency: int = 64  # solves decoded at once (they share engine batches)
    max_queue: int = 256  # solves waiting for one of those slots; beyond it a 429
    request_timeout_s: float = 120.0  # from arrival: waiting for a slot counts
    max_body_bytes: int = 16 * 1024
    body_timeout_s: float = 10.0  # to send the whole body, once the headers are in


MIN_TEMPERATURE = 0.01  # below it (but above 0) sampling divides by ~0: decode greedily instead


def _whole(value):
    """JSON's integers: 24.0 is one (as JSON Schema says), 24.5 or true or "24" is not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_whole)]


class SolveRequest(BaseModel):
    # Strict: `"target": true` or `"5_0"` is a 422, never solved as 1 or 50; an unknown field
    # (a misspelt `temprature`) is a 422, never silently ignored.
    model_config = ConfigDict(strict=True, extra="forbid")

    nums: list[Integer] = Field(description="the starting numbers (2 to 6 of them)")
    target: Integer = Field(description="the number to reach")
    budget: Integer | None = Field(default=None, description="ask for at most N child threads "
                               "(`Sub Call Budget: N `); the model must have been trained with it")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False,
                               description=f"0 decodes greedily; else {MIN_TEMPERATURE} to 2")
    max_tokens: Integer | None = Field(default=None, description="context window of each thread")
    trace: bool = Field(default=False, description="return every thread's prompt and text")

    @field_validator("nums")
    @classmethod
    def _two_or_more(cls, nums: list[int]) -> list[int]:
        if len(nums) < 2:
            raise ValueError("give at least 2 numbers")
        return nums

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampled(cls, temperature: float) -> float:
        if 0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"use 0 (greedy) or at least {MIN_TEMPERATURE}")
        return temperature

    def problem(self, limits: ServerLimits) -> str | None:
        """What is outside `limits`, as `field: what to fix`; None when nothing is."""
        if len(self.nums) > limits.max_numbers:
            return f"nums: at most {limits.max_numbers} numbers"
        if any(n < 1 or n > limits.max_number for n in self.nums):
            return f"nums: every number must be in 1..{limits.max_number}"
        if not 1 <= self.target <= limits.max_target:
            return f"target: must be in 1..{limits.max_target}"
        if self.budget is not None and not 1 <= self.budget <= limits.max_budget:
            return f"budget: must be in 1..{limits.max_budget}"
        if self.max_tokens is not None and not 16 <= self.max_tokens <= limits.max_tokens:
            return f"max_tokens: must be in 16..{limits.max_tokens}"
        return None


class SolveResponse(BaseModel):
    solution: list[str] | None
    correct: bool
    failure: str | None
    threads: int
    children: int
    tokens: dict[str, int]
    latency_s: float
    trace: list[dict] | None = None

    @classmethod
    def of(cls, result: Solve, latency_s: float, trace: bool) -> SolveResponse:
        return cls(
            solution=result.solution, correct=result.correct, failure=result.failure,
            threads=len(result.threads), children=result.children,
            tokens={"total": result.tokens_total, "sequential": result.tokens_sequential,
                    "generated": result.tokens_generated,
                    "longest_context": result.longest_context},
            latency_s=round(latency_s, 4),
            trace=[{"role": t.role, "prompt": t.prompt, "text": t.text, "spawn": t.spawn,
                    "index": t.index} for t in result.threads] if trace else None)


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx: what went wrong, for a person, and its kind, for a program (the
    `kind` label of `apr_errors_total`). A 5xx names no internals: they are in the log."""

    error: str
    kind: str


def state_limits(openapi: dict, limits: ServerLimits) -> dict:
    """The OpenAPI document with the bounds `SolveRequest.problem` enforces written into the
    request's schema: clients, generated SDKs and the fuzzer see the limits the server checks."""
    fields = openapi["components"]["schemas"]["SolveRequest"]["properties"]
    fields["nums"].update(minItems=2, maxItems=limits.max_numbers)
    fields["nums"]["items"].update(minimum=1, maximum=limits.max_number)
    fields["target"].update(minimum=1, maximum=limits.max_target)
    for name, low, high in (("budget", 1, limits.max_budget), ("max_tokens", 16, limits.max_tokens)):
        integer = next(o for o in fields[name]["anyOf"] if o.get("type") == "integer")
        integer.update(minimum=low, maximum=high)
    temperature = fields["temperature"]
    high = temperature.pop("maximum")
    temperature.pop("minimum")
    temperature.pop("type")
    temperature["anyOf"] = [{"type": "number", "enum": [0]},
                            {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": high}]
    return openapi


# Every answer of `POST /v1/solve` other than 200 (a 422 FastAPI documents itself), stated in
# the OpenAPI document: all carry an ErrorResponse.
SOLVE_ERRORS = {
    400: "the body is not JSON",
    401: "missing or wrong bearer token (when the server has one)",
    408: "the body did not arrive in time",
    413: "the body is over the size limit",
    429: "the server is at capacity: retry after `Retry-After` seconds",
    503: "the engine is unavailable: retry later",
    504: "the solve ran past the request timeout",
}


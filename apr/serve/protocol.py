"""Every request and response structure of the APR server, and the limits a request must
keep: the wire contract of `POST /v1/solve` in one place. `apr.serve.app` only translates
between HTTP and these.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


MIN_TEMPERATURE = 0.01  # below it (but above 0) sampling divides by ~0: decode greedily instead


class SolveRequest(BaseModel):
    # Strict: `"target": true` or `"5_0"` is a 422, never solved as 1 or 50; an unknown field
    # (a misspelt `temprature`) is a 422, never silently ignored.
    model_config = ConfigDict(strict=True, extra="forbid")

    nums: list[int] = Field(description="the starting numbers (2 to 6 of them)")
    target: int = Field(description="the number to reach")
    budget: int | None = Field(default=None, description="ask for at most N child threads "
                               "(`Sub Call Budget: N `); the model must have been trained with it")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False,
                               description=f"0 decodes greedily; else {MIN_TEMPERATURE} to 2")
    max_tokens: int | None = Field(default=None, description="context window of each thread")
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

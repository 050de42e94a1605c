"""The engine interface: continue a batch of prompts, with stop strings, a new-token limit and
a temperature; report text, why each stopped, and token counts.

Every engine is asynchronous so that many solves can wait on it at once; engines that batch
(local, SGLang) put concurrent requests into shared batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

STOP, LENGTH, ABORT = "stop", "length", "abort"
BATCHING = ("auto", "shrink", "generate")  # the local engine's decode loops (apr/decode/local.py)


@dataclass(frozen=True)
class Sampling:
    """What SGLang calls sampling_params, the subset the runtime uses."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # SGLang's top-level `return_logprob`: what RL training needs


@dataclass(frozen=True)
class Completion:
    text: str  # the continuation; a matched stop string is kept at its end
    finish_reason: str  # "stop" (a stop string or EOS), "length" or "abort"
    matched: str | None  # the stop string that ended it (None for EOS or length)
    prompt_tokens: int
    completion_tokens: int
    weight_version: str | None = None
    meta: dict = field(default_factory=dict, compare=False)
    # The sampled token ids (an EOS included) and, when asked for, the log-prob of each under
    # the sampling distribution (logits / temperature), as SGLang reports them.
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()


class EngineError(RuntimeError):
    """The engine failed (unreachable, timed out, answered an error): not the model's fault."""


class Engine(Protocol):
    async def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[Completion]:
        """One completion per prompt, in order."""
        ...

    async def ready(self) -> bool:
        """Whether the engine can serve now (model loaded, server reachable)."""
        ...

    async def close(self) -> None:
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """Cut `text` just after the earliest stop string in it (kept, like SGLang's no_stop_trim)."""
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best[0]):
            best = (i + len(s), s)
    if best is None:
        return text, None
    return text[:best[0]], best[1]

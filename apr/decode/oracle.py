"""An engine that answers from the solver's recorded traces.

For the prompt of any thread of a known problem it returns exactly what the solver wrote for
that thread (cut at the request's stop strings and token limit, as a model would be). With it
the runtime, the evaluation and GRPO's plumbing run end to end with exact expected answers.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from apr import tokenizer as domain_tokenizer
from apr.decode.engine import (
    LENGTH,
    STOP,
    Completion,
    EngineError,
    Sampling,
    cut_at_stop,
)


class OracleEngine:
    def __init__(self, records: Iterable[dict]):
        """`records`: datagen trace records (APR or SoS+), each with its `threads`."""
        self.threads: dict[str, str] = {}
        for record in records:
            for thread in record["threads"]:
                self.threads[thread["prompt"]] = thread["text"]
        self._tok = None

    async def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[Completion]:
        return [self._answer(p, sampling) for p in prompts]

    def _answer(self, prompt: str, sampling: Sampling) -> Completion:
        if prompt not in self.threads:
            raise EngineError(f"the oracle has no recorded thread for this prompt: {prompt[-160:]!r}")
        text, matched = cut_at_stop(self.threads[prompt], sampling.stop)
        ids = self._encode(text)
        reason = STOP
        if len(ids) > sampling.max_new_tokens:
            ids = ids[:sampling.max_new_tokens]
            text, reason, matched = self._tok.decode(ids, skip_special_tokens=False), LENGTH, None
        elif matched is None:
            ids.append(self._tok.token_to_id(domain_tokenizer.EOS))  # the model's EOS
        return Completion(text, reason, matched, domain_tokenizer.count_tokens(prompt) + 1,
                          len(ids), token_ids=tuple(ids))

    def _encode(self, text: str) -> list[int]:
        if self._tok is None:
            self._tok = domain_tokenizer.build()
        return self._tok.encode(text, add_special_tokens=False).ids

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        return None

"""The local engine: transformers in process, concurrent requests decoded in shared batches.

Requests that arrive while a batch decodes wait and go together into the next one. A batch is
grouped by (temperature, top_p, stop strings); rows are left-padded and decoded by
`model.generate` up to the longest row limit, then each row is cut at its own stop string and
token limit (cutting later is the same as stopping there: decoding is left to right). The KV
cache is transformers' static cache (which it compiles on CUDA). On CPU too: the dynamic
cache's per-step concatenation took over half of a long greedy batch's time, and the static
one decoded 1,000-token threads 1.28x faster (equal at 512; `bench/local_decode.py`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from apr.engine.base import LENGTH, STOP, Completion, Sampling, cut_at_stop


@dataclass
class DecodeStats:
    """What the model has done so far: for benchmarks (busy time against wall time)."""

    batches: int = 0
    rows: int = 0
    steps: int = 0  # decode steps, summed over batches
    busy_s: float = 0.0  # seconds inside generate and the log-prob pass


@dataclass
class _Request:
    prompts: Sequence[str]
    sampling: Sampling
    future: asyncio.Future


class LocalEngine:
    def __init__(self, model_dir: str | Path, device: str = "auto", max_batch: int = 64,
                 dtype: str = "auto", static_cache: bool = True, cpu_threads: int = 1):
        import torch
        from transformers import AutoTokenizer

        from apr import model as model_lib

        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if self.device.type == "cpu" and cpu_threads:
            # A decode step of a small model is little work: extra OpenMP threads mostly spin,
            # and on a busy 2-core machine they slowed decoding by more than 10x.
            torch.set_num_threads(cpu_threads)
        torch_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                       "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        self.model_dir = Path(model_dir)
        self.model = model_lib.load(model_dir, device=str(self.device), dtype=torch_dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.max_batch = max_batch
        self.static_cache = static_cache
        self.weight_version: str | None = None
        self.stats = DecodeStats()
        self._queue: list[_Request] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._lock = threading.Lock()  # one batch at a time on the model (weight reloads too)

    # --- the async face ------------------------------------------------------------------
    async def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[Completion]:
        if not prompts:
            return []
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        future = loop.create_future()
        self._queue.append(_Request(list(prompts), sampling, future))
        self._wake.set()
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            requests, self._queue = self._queue, []
            groups: dict[tuple, list[_Request]] = {}
            for r in requests:
                key = (r.sampling.temperature, r.sampling.top_p, tuple(sorted(r.sampling.stop)))
                groups.setdefault(key, []).append(r)
            for group in groups.values():
                try:
                    results = await loop.run_in_executor(None, self._decode_group, group)
                except Exception as e:  # noqa: BLE001 - handed to every waiting caller
                    for r in group:
                        if not r.future.done():
                            r.future.set_exception(e)
                    continue
                for r, completions in zip(group, results):
                    if not r.future.done():
                        r.future.set_result(completions)

    def _decode_group(self, group: list[_Request]) -> list[list[Completion]]:
        rows = [(p, r.sampling) for r in group for p in r.prompts]
        flat: list[Completion] = []
        for start in range(0, len(rows), self.max_batch):
            flat.extend(self.decode(rows[start:start + self.max_batch]))
        out, k = [], 0
        for r in group:
            out.append(flat[k:k + len(r.prompts)])
            k += len(r.prompts)
        return out

    # --- the batch itself ------------------------------------------------------------------
    def decode(self, rows: list[tuple[str, Sampling]]) -> list[Completion]:
        """One batched `generate` over rows that share temperature, top_p and stop strings."""
        import torch

        sampling = rows[0][1]
        with self._lock:
            batch = self.tokenizer([p for p, _ in rows], return_tensors="pt", padding=True)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            limit = max(s.max_new_tokens for _, s in rows)
            kwargs = dict(max_new_tokens=limit, pad_token_id=self.tokenizer.pad_token_id,
                          eos_token_id=self.tokenizer.eos_token_id)
            if sampling.temperature > 0:
                kwargs.update(do_sample=True, temperature=sampling.temperature,
                              top_p=sampling.top_p, top_k=0)
            else:
                kwargs.update(do_sample=False)
            if sampling.stop:
                kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
            if self.static_cache:
                kwargs.update(cache_implementation="static")
            started = time.perf_counter()
            with torch.inference_mode():
                output = self.model.generate(**batch, **kwargs)
                width = batch["input_ids"].shape[1]
                generated = output[:, width:]
                chosen = None
                if any(s.logprobs for _, s in rows):
                    chosen = self._logprobs(batch["attention_mask"], output, width,
                                            sampling.temperature)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.stats.busy_s += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.rows += len(rows)
            self.stats.steps += generated.shape[1]
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [self._completion(generated[i].tolist(), prompt_lengths[i], s,
                                 chosen[i] if chosen is not None and s.logprobs else None)
                for i, (_, s) in enumerate(rows)]

    def _logprobs(self, prompt_mask, output, width: int, temperature: float) -> list[list[float]]:
        """Log-probs of the sampled tokens, log_softmax(logits / temperature) as SGLang reports
        them, from one forward pass over the finished batch (generate's own `output_logits`
        grew this process by gigabytes on CPU). Positions follow the left padding, as in
        generate, so the scores are those the tokens were sampled from."""
        import torch

        from apr.model import sampled_logprobs

        mask = torch.cat([prompt_mask, torch.ones_like(output[:, width:])], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=output, attention_mask=mask,
                            position_ids=positions).logits[:, width - 1:-1]
        return sampled_logprobs(logits, output[:, width:], temperature).cpu().tolist()

    def _completion(self, ids: list[int], prompt_tokens: int, sampling: Sampling,
                    logprobs: list[float] | None) -> Completion:
        """Cut one row where its own decoding ended: EOS (kept as a generated token), its
        stop string, or its token limit. Rows that finish early are filled with padding."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ids = ids[:sampling.max_new_tokens]
        ended = eos in ids
        if ended:
            ids = ids[:ids.index(eos) + 1]
        else:
            while ids and ids[-1] == pad:
                ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text, matched = cut_at_stop(text, sampling.stop)
        if matched is not None:
            reason = STOP
            ids = ids[:self._tokens_through_stop(ids, matched)]
        else:
            reason = STOP if ended else LENGTH
        return Completion(text, reason, matched, prompt_tokens, len(ids), self.weight_version,
                          token_ids=tuple(ids),
                          logprobs=tuple(logprobs[:len(ids)]) if logprobs is not None else ())

    def _tokens_through_stop(self, ids: list[int], stop: str) -> int:
        """How many tokens it takes to write the first `stop`: generation ends on that token."""
        if stop not in self.tokenizer.decode(ids[:-1], skip_special_tokens=True):
            return len(ids)  # the usual case: decoding stopped right on it
        for n in range(1, len(ids) + 1):
            if stop in self.tokenizer.decode(ids[:n], skip_special_tokens=True):
                return n
        return len(ids)

    # --- weights ------------------------------------------------------------------------
    def load_weights(self, model_dir: str | Path, version: str | None = None) -> None:
        """Swap in the weights of a saved model directory (safetensors), between batches."""
        from safetensors.torch import load_file

        path = Path(model_dir) / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no model.safetensors in {model_dir}")
        state = load_file(path, device=str(self.device))
        with self._lock:
            self.model.load_state_dict(state)
            self.weight_version = version

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

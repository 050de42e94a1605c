"""The local engine: transformers in process, concurrent requests decoded in shared batches.

Requests that arrive while a batch decodes wait and go together into the next one. A batch is
grouped by (temperature, top_p, stop strings) and its rows are left-padded. Two decode loops:

* `shrink` (the default on CPU): our own loop over the model with transformers' dynamic KV
  cache, where a row leaves the batch (its cache rows with it) the step it ends: EOS, its stop
  string (transformers' `StopStringCriteria`) or its own token limit. On a CPU a step costs
  in proportion to the rows it holds, and most rows of a rollout batch end long before the
  longest: a GRPO step's rollouts decoded 4.3x faster than with `generate`
  (`bench/rollout_batch.py`, docs/RESULTS.md).
  Log-probs are taken from the logits each token was sampled from, as SGLang does.
* `generate` (the default on CUDA): `model.generate` with transformers' static cache, which
  it compiles there; every row runs to the longest and is cut afterwards at its own stop
  string and limit (cutting later is the same as stopping there: decoding is left to right);
  log-probs from one forward pass over the finished batch. Not measured on a GPU against
  `shrink` yet.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from apr.decode.engine import BATCHING, LENGTH, STOP, Completion, Sampling, cut_at_stop


@dataclass
class DecodeStats:
    """What the model has done so far: for benchmarks (busy time against wall time)."""

    batches: int = 0
    rows: int = 0
    steps: int = 0  # decode steps, summed over batches
    row_steps: int = 0  # rows decoded, summed over steps: padding rows included with `generate`
    busy_s: float = 0.0  # seconds decoding (and in `generate`'s log-prob pass)
    abandoned_rows: int = 0  # rows dropped mid-batch: their callers had gone


@dataclass
class _Request:
    prompts: Sequence[str]
    sampling: Sampling
    future: asyncio.Future


class LocalEngine:
    def __init__(self, model_dir: str | Path, device: str = "auto", max_batch: int = 64,
                 dtype: str = "auto", batching: str = "auto", cpu_threads: int = 0):
        import torch

        from apr import model as model_lib

        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if self.device.type == "cpu" and cpu_threads:
            # Process-wide, so only when asked (a server sharing its cores with a trainer):
            # on an idle 2-core machine all threads decode 1.02-1.14x as fast as one
            # (bench/engine_threads.py), so evaluation keeps torch's own thread count.
            torch.set_num_threads(cpu_threads)
        torch_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                       "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        self.model_dir = Path(model_dir)
        self.model = model_lib.load(model_dir, device=str(self.device), dtype=torch_dtype).eval()
        self.tokenizer = model_lib.load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left"
        self.max_batch = max_batch
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, not {batching!r}")
        if batching == "auto":
            batching = "generate" if self.device.type == "cuda" else "shrink"
        self.batching = batching
        # newer transformers name the forward's `past_key_values` `cache`
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
            else "past_key_values"
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
        # a request whose caller went away (a timeout, a client gone) cancels its future:
        # its rows leave the batch at the next step instead of decoding for nobody
        abandoned = [r.future.cancelled for r in group for _ in r.prompts]
        flat: list[Completion] = []
        for start in range(0, len(rows), self.max_batch):
            flat.extend(self.decode(rows[start:start + self.max_batch],
                                    abandoned[start:start + self.max_batch]))
        out, k = [], 0
        for r in group:
            out.append(flat[k:k + len(r.prompts)])
            k += len(r.prompts)
        return out

    # --- the batch itself ------------------------------------------------------------------
    def decode(self, rows: list[tuple[str, Sampling]],
               abandoned: Sequence[Callable[[], bool]] = ()) -> list[Completion]:
        """One batch of rows that share temperature, top_p and stop strings. `abandoned[i]()`
        true: nobody waits for row i any more (the shrinking loop drops it)."""
        import torch

        sampling = rows[0][1]
        with self._lock:
            batch = self.tokenizer([p for p, _ in rows], return_tensors="pt", padding=True)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            started = time.perf_counter()
            with torch.inference_mode():
                if self.batching == "shrink":
                    generated, logprobs = self._shrinking(batch, rows, sampling, abandoned)
                else:
                    generated, logprobs = self._generate(batch, rows, sampling)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.stats.busy_s += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.rows += len(rows)
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [self._completion(generated[i], prompt_lengths[i], s,
                                 logprobs[i] if logprobs is not None and s.logprobs else None)
                for i, (_, s) in enumerate(rows)]

    def _shrinking(self, batch: dict, rows: list[tuple[str, Sampling]], sampling: Sampling,
                   abandoned: Sequence[Callable[[], bool]] = ()
                   ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Decodes with rows leaving the batch as they end; each row's ids (and log-probs)."""
        import torch
        from transformers import (
            DynamicCache,
            LogitsProcessorList,
            StopStringCriteria,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        from apr.model import sampled_logprobs

        warpers = LogitsProcessorList()
        if sampling.temperature > 0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_p < 1:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        stop = StopStringCriteria(self.tokenizer, list(sampling.stop)) if sampling.stop else None
        # The stop check reads only the last tokens (a token is at least one character), and
        # the warpers read none: keep that tail, not the whole sequence.
        tail = stop.maximum_token_len if stop is not None else 1
        want_logprobs = any(s.logprobs for _, s in rows)
        limits = torch.tensor([s.max_new_tokens for _, s in rows], device=self.device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        generated: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        alive = torch.arange(len(rows), device=self.device)  # each batch row's index in `rows`
        seq, position = ids[:, -tail:], positions[:, -1]
        logits = self._forward(ids, mask, positions, cache)
        for step in range(1, int(limits.max()) + 1):
            scores = warpers(seq, logits)
            if sampling.temperature > 0:
                token = torch.multinomial(scores.softmax(-1), 1)[:, 0]
            else:
                token = scores.argmax(-1)
            seq = torch.cat([seq, token[:, None]], dim=1)[:, -tail:]
            chosen = sampled_logprobs(logits, token, sampling.temperature).tolist() \
                if want_logprobs else None
            for j, (i, t) in enumerate(zip(alive.tolist(), token.tolist())):
                generated[i].append(t)
                if chosen is not None:
                    logprobs[i].append(chosen[j])
            self.stats.steps += 1
            self.stats.row_steps += len(alive)
            ended = (token == self.tokenizer.eos_token_id) | (limits[alive] <= step)
            if stop is not None:
                ended |= stop(seq, None)
            if abandoned:
                gone = [abandoned[i]() for i in alive.tolist()]
                if any(gone):
                    ended |= torch.tensor(gone, device=self.device)
                    self.stats.abandoned_rows += sum(gone)
            if bool(ended.all()):
                break
            if bool(ended.any()):
                keep = (~ended).nonzero()[:, 0]
                alive, seq, mask, position, token = (
                    alive[keep], seq[keep], mask[keep], position[keep], token[keep])
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            position = position + 1
            logits = self._forward(token[:, None], mask, position[:, None], cache)
        return generated, logprobs if want_logprobs else None

    def _forward(self, ids, mask, positions, cache):
        """The last position's logits, float32, the cache extended by `ids`."""
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, **{self._cache_arg: cache}).logits[:, -1].float()

    def _generate(self, batch: dict, rows: list[tuple[str, Sampling]], sampling: Sampling
                  ) -> tuple[list[list[int]], list[list[float]] | None]:
        """`model.generate` to the longest row limit; each row's ids (padded after its end)."""
        kwargs = dict(max_new_tokens=max(s.max_new_tokens for _, s in rows),
                      pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id, cache_implementation="static")
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        output = self.model.generate(**batch, **kwargs)
        width = batch["input_ids"].shape[1]
        self.stats.steps += output.shape[1] - width
        self.stats.row_steps += (output.shape[1] - width) * len(rows)
        logprobs = None
        if any(s.logprobs for _, s in rows):
            logprobs = self._logprobs(batch["attention_mask"], output, width,
                                      sampling.temperature)
        return output[:, width:].tolist(), logprobs

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

"""Decoding speed of the local engine inside the APR runtime, against `model.generate`.

    python bench/local_decode.py --model runs/gpu/sft-apr/model --problems runs/gpu/data
    python bench/local_decode.py --model runs/grpo-bench/sft/model --problems runs/grpo-bench/data \
        --problems-n 64 --context 1024 --baseline-tokens 512 --warmups 1 --k-children 8 (CPU)

Three measurements, in one process, after warm-up:
1. Baseline: `model.generate` on random 64-token prompts, every row decoding the full
   `--baseline-tokens`, with the dynamic and the static KV cache: milliseconds per step.
2. The runtime: greedy APR solves of real val problems through the local engine (stop strings,
   batches that change as threads spawn and finish). Its milliseconds per decode step, and the
   share of wall time the engine sat idle (parsing, joining, scheduling: the bookkeeping).
3. Spawn cost: solves with two or more children, one at a time; each solve's wall time over
   the time of its parent calls plus its longest child decoded alone. 1.0 means children cost
   no more than the longest of them; k means they ran one after another.
Needs a trained model: with random weights the parent rarely spawns.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from apr.countdown.trace import SPAWN_END
from apr.dataset import load_problems
from apr.decode.local import DecodeStats, LocalEngine
from apr.decode.runtime import Budgets, solve_apr
from apr.stages.evaluate import EvalConfig, evaluate


def baseline_ms_per_step(model, batch: int, new_tokens: int, static: bool, warmups: int
                         ) -> float:
    """`generate` with every row decoding `new_tokens` (no early stop), after warm-up runs of
    the same shape (on CUDA the static cache compiles per shape)."""
    ids = torch.randint(4, model.config.vocab_size, (batch, 64), device=model.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        for _ in range(warmups):
            model.generate(input_ids=ids, **kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(input_ids=ids, **kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - started) / new_tokens * 1000


class TimedCalls:
    """An engine wrapper that times each call (for solves run one at a time)."""

    def __init__(self, engine: LocalEngine):
        self.engine = engine
        self.calls: list[tuple[list[str], object, float, list]] = []

    async def generate(self, prompts, sampling):
        started = time.perf_counter()
        outs = await self.engine.generate(prompts, sampling)
        self.calls.append((list(prompts), sampling, time.perf_counter() - started, outs))
        return outs


async def spawn_cost(engine: LocalEngine, problems: list[dict], context: int, wanted: int
                     ) -> list[tuple[int, float]]:
    """(children, wall / (parent calls + longest child alone)) for solves with >= 2 children."""
    out = []
    for p in problems:
        timed = TimedCalls(engine)
        started = time.perf_counter()
        solve = await solve_apr(timed, p["nums"], p["target"], Budgets(context=context))
        wall = time.perf_counter() - started
        if solve.children < 2:
            continue
        floor = 0.0
        for prompts, sampling, seconds, outs in timed.calls:
            if SPAWN_END in sampling.stop:
                floor += seconds
                continue
            longest = max(range(len(outs)), key=lambda i: outs[i].completion_tokens)
            await engine.generate([prompts[longest]], sampling)  # a batch of 1 may compile
            alone = time.perf_counter()
            await engine.generate([prompts[longest]], sampling)
            floor += time.perf_counter() - alone
        out.append((solve.children, wall / floor))
        if len(out) == wanted:
            break
    return out


@dataclass
class Measured:
    """What `measure` found: the baseline per cache, the runtime's solves and engine stats."""

    baseline_batch: int
    base_ms: dict[bool, float]  # static cache? -> ms per step of `generate`
    solves: int
    accuracy: float
    wall_s: float
    stats: DecodeStats
    spawn_ratios: list[tuple[int, float]]

    @property
    def runtime_ms(self) -> float:
        return self.stats.busy_s / self.stats.steps * 1000

    @property
    def idle_share(self) -> float:
        return 1 - self.stats.busy_s / self.wall_s


def measure(engine: LocalEngine, problems_dir: str, problems_n: int = 1000, context: int = 4096,
            baseline_batch: int = 64, baseline_tokens: int = 256, warmups: int = 2,
            k_children: int = 20) -> Measured:
    """The three measurements on one engine (callable from bench/gpu_suite.py); with
    `k_children` 0 the spawn cost (solves one at a time: slow) is left out."""
    model = engine.model
    base = {static: baseline_ms_per_step(model, baseline_batch, baseline_tokens, static, warmups)
            for static in (False, True)}

    problems = load_problems(problems_dir, "val", problems_n)
    config = EvalConfig(context=context, modes=["apr"], max_problems=problems_n)
    asyncio.run(evaluate(engine, problems[:8], config, progress=False))  # warm-up
    engine.stats = DecodeStats()
    started = time.perf_counter()
    rows, _ = asyncio.run(evaluate(engine, problems, config, progress=False))
    wall = time.perf_counter() - started
    stats = dataclasses.replace(engine.stats)  # before the spawn-cost solves add to it
    ratios = asyncio.run(spawn_cost(engine, problems, context, k_children)) if k_children else []
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    return Measured(baseline_batch, base, len(rows), accuracy, wall, stats, ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained model directory")
    parser.add_argument("--problems", required=True, help="an `apr datagen` output")
    parser.add_argument("--problems-n", type=int, default=1000)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--baseline-batch", type=int, default=64)
    parser.add_argument("--baseline-tokens", type=int, default=256)
    parser.add_argument("--warmups", type=int, default=2, help="baseline warm-up runs")
    parser.add_argument("--k-children", type=int, default=20,
                        help="solves timed for spawn cost (0: none)")
    args = parser.parse_args()

    engine = LocalEngine(args.model)
    model = engine.model
    device = model.device
    print(f"device {device}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"batching in the engine: {engine.batching}")

    m = measure(engine, args.problems, args.problems_n, args.context, args.baseline_batch,
                args.baseline_tokens, args.warmups, args.k_children)
    base, stats, ours, ratios = m.base_ms, m.stats, m.runtime_ms, m.spawn_ratios
    table = [
        (f"baseline generate, dynamic cache, batch {args.baseline_batch}", f"{base[False]:.2f} ms/step"),
        (f"baseline generate, static cache, batch {args.baseline_batch}", f"{base[True]:.2f} ms/step"),
        (f"runtime: {m.solves} APR solves (accuracy {m.accuracy:.3f})", f"{m.wall_s:.1f} s wall"),
        (f"runtime: engine step ({stats.batches} batches, {stats.rows / stats.batches:.1f} rows each)",
         f"{ours:.2f} ms/step"),
        ("runtime step / static baseline step", f"{ours / base[True]:.2f}x"),
        ("engine idle share of wall time (bookkeeping)", f"{m.idle_share:.1%}"),
    ]
    if ratios:
        values = [r for _, r in ratios]
        children = statistics.mean(k for k, _ in ratios)
        table.append((f"spawn cost, {len(ratios)} solves of {children:.1f} children: wall / "
                      "(parent + longest child)",
                      f"median {statistics.median(values):.2f}, max {max(values):.2f}"))
    print("\n| measurement | value |\n|---|---:|")
    for name, value in table:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()

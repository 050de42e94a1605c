"""How fast GRPO's rollouts decode on the local engine, by its batch size (rows per `generate`).

    python bench/rollout_batch.py --model runs/grpo-bench/sft/model \
        --problems runs/grpo-bench/data --batches 64 256 --rounds 3

A GRPO step of the CPU benchmark is 8 problems x 8 sampled APR rollouts, all in flight at
once: 64 parents, then a few hundred children in one wave. With `max_batch` 64 the children
decode in several batches, one after another, each as long as its longest row. This times the
same rollouts (`apr.rollouts.collect`, temperature and log-probs as GRPO asks) through one
in-process engine whose batch size is set before each run, the sizes taking turns in each
round so that a busy machine slows them alike, and prints seconds per step, generated tokens
per second and each size's ratio to the first (the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from apr.engine.local import DecodeStats, LocalEngine
from apr.evaluate import load_problems
from apr.rollouts import collect
from apr.runtime import Budgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained model directory")
    parser.add_argument("--problems", required=True, help="an `apr datagen` output")
    parser.add_argument("--prompts", type=int, default=8, help="problems per step")
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per problem")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256],
                        help="max_batch values; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    problems = load_problems(args.problems, "train", args.prompts * args.rounds)
    budgets = Budgets(context=args.context)
    engine = LocalEngine(args.model)
    # one model for all sizes: max_batch is read each time a group is cut into batches
    asyncio.run(collect(engine, problems[:2], 2, "apr", budgets, args.temperature))  # warm-up
    seconds: dict[int, list[float]] = {b: [] for b in args.batches}
    tokens: dict[int, list[int]] = {b: [] for b in args.batches}
    rows: dict[int, list[float]] = {b: [] for b in args.batches}
    for r in range(args.rounds):
        step = problems[r * args.prompts:(r + 1) * args.prompts]
        for size in args.batches:
            engine.max_batch, engine.stats = size, DecodeStats()
            started = time.perf_counter()
            rollouts = asyncio.run(collect(engine, step, args.group_size, "apr", budgets,
                                           args.temperature))
            seconds[size].append(time.perf_counter() - started)
            tokens[size].append(sum(x.solve.tokens_generated for x in rollouts))
            rows[size].append(engine.stats.rows / max(1, engine.stats.batches))
            print(f"round {r}, max_batch {size}: {seconds[size][-1]:.1f} s, "
                  f"{tokens[size][-1]} tokens, {engine.stats.batches} batches", flush=True)

    base = args.batches[0]
    base_rate = sum(tokens[base]) / sum(seconds[base])
    print(f"\n{args.rounds} rounds of {args.prompts} problems x {args.group_size} rollouts "
          f"(context {args.context}, temperature {args.temperature})")
    print("\n| max_batch | s per step (median) | rows per batch | tokens/s | tokens/s vs "
          f"{base} |\n|---:|---:|---:|---:|---:|")
    for size in args.batches:
        rate = sum(tokens[size]) / sum(seconds[size])
        print(f"| {size} | {statistics.median(seconds[size]):.1f} | "
              f"{statistics.mean(rows[size]):.1f} | {rate:.0f} | {rate / base_rate:.2f}x |")


if __name__ == "__main__":
    main()

"""How fast GRPO's rollouts decode on the local engine, by its decode loop and batch size.

    python bench/rollout_batch.py --model runs/grpo-bench/sft/model \
        --problems runs/grpo-bench/data --engines generate:64 shrink:64 shrink:256 --rounds 3

A GRPO step of the CPU benchmark is 8 problems x 8 sampled APR rollouts, all in flight at
once: 64 parents, then a few hundred children in one wave. With `max_batch` 64 the children
decode in several batches, one after another. `generate` runs each batch as long as its
longest row; `shrink` drops rows as they end. This times the same rollouts
(`apr.rl.rollouts.collect`, temperature and log-probs as GRPO asks) through one in-process engine
whose loop and batch size (`batching:max_batch`) are set before each run, the settings taking
turns in each round so that a busy machine slows them alike, and prints seconds per step,
generated tokens per second and each setting's ratio to the first (the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from apr.dataset import load_problems
from apr.decode.local import BATCHING, DecodeStats, LocalEngine
from apr.decode.runtime import Budgets
from apr.rl.rollouts import collect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained model directory")
    parser.add_argument("--problems", required=True, help="an `apr datagen` output")
    parser.add_argument("--prompts", type=int, default=8, help="problems per step")
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per problem")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--engines", nargs="+", default=["generate:64", "shrink:64"],
                        help="batching:max_batch settings; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    settings = [parse_setting(x) for x in args.engines]
    problems = load_problems(args.problems, "train", args.prompts * args.rounds)
    budgets = Budgets(context=args.context)
    engine = LocalEngine(args.model)
    # one model for all settings: both are read each time a group is cut into batches
    asyncio.run(collect(engine, problems[:2], 2, "apr", budgets, args.temperature))  # warm-up
    seconds: dict[str, list[float]] = {x: [] for x in args.engines}
    tokens: dict[str, list[int]] = {x: [] for x in args.engines}
    rows: dict[str, list[float]] = {x: [] for x in args.engines}
    for r in range(args.rounds):
        step = problems[r * args.prompts:(r + 1) * args.prompts]
        for name, (batching, size) in zip(args.engines, settings):
            engine.batching, engine.max_batch, engine.stats = batching, size, DecodeStats()
            started = time.perf_counter()
            rollouts = asyncio.run(collect(engine, step, args.group_size, "apr", budgets,
                                           args.temperature))
            seconds[name].append(time.perf_counter() - started)
            tokens[name].append(sum(x.solve.tokens_generated for x in rollouts))
            rows[name].append(engine.stats.rows / max(1, engine.stats.batches))
            print(f"round {r}, {name}: {seconds[name][-1]:.1f} s, {tokens[name][-1]} tokens, "
                  f"{engine.stats.batches} batches", flush=True)

    base = args.engines[0]
    base_rate = sum(tokens[base]) / sum(seconds[base])
    print(f"\n{args.rounds} rounds of {args.prompts} problems x {args.group_size} rollouts "
          f"(context {args.context}, temperature {args.temperature})")
    print("\n| batching:max_batch | s per step (median) | rows per batch | tokens/s | "
          f"tokens/s vs {base} |\n|---|---:|---:|---:|---:|")
    for name in args.engines:
        rate = sum(tokens[name]) / sum(seconds[name])
        print(f"| {name} | {statistics.median(seconds[name]):.1f} | "
              f"{statistics.mean(rows[name]):.1f} | {rate:.0f} | {rate / base_rate:.2f}x |")


def parse_setting(text: str) -> tuple[str, int]:
    batching, _, size = text.partition(":")
    if batching not in BATCHING or batching == "auto" or not size.isdigit():
        raise SystemExit(f"--engines takes batching:max_batch (shrink:64, generate:64), "
                         f"not {text!r}")
    return batching, int(size)


if __name__ == "__main__":
    main()

"""Does the local engine decode faster on one CPU thread or on all of them?

    python bench/engine_threads.py                                   (a random tiny model)
    python bench/engine_threads.py --model runs/demo/.../model --problems runs/demo/.../data

The same APR evaluation (greedy, `--problems-n` problems, `--concurrency` solves sharing
batches) runs `--rounds` times with torch on 1 thread and on every core, interleaved, in one
process (torch's thread count is process-wide). Prints each setting's median wall time and
tokens/s and their ratio. With a random model no thread stops early: every thread decodes to
the context window, which is a decode-speed test at full batches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import torch

from apr import model as model_lib
from apr.countdown.problems import ProblemSpace, candidates
from apr.dataset import load_problems
from apr.decode.local import LocalEngine
from apr.stages.evaluate import EvalConfig, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (default: a random tiny model)")
    parser.add_argument("--problems", help="an `apr datagen` output (default: generated)")
    parser.add_argument("--problems-n", type=int, default=32)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or model_lib.save(model_lib.build("tiny", seed=0), f"{tmp}/model")
        if args.problems:
            problems = load_problems(args.problems, "val", args.problems_n)
        else:
            problems = [p.to_json() for p in candidates(ProblemSpace(), 7, 0, args.problems_n)]
        engine = LocalEngine(model_dir, device="cpu", cpu_threads=0)
        config = EvalConfig(context=args.context, modes=["apr"], concurrency=args.concurrency,
                            max_problems=args.problems_n)
        settings = {"1 thread": 1, f"{os.cpu_count()} threads": os.cpu_count() or 1}
        seconds: dict[str, list[float]] = {name: [] for name in settings}
        tokens: dict[str, int] = {}
        asyncio.run(evaluate(engine, problems[:4], config, progress=False))  # warm-up
        for r in range(args.rounds):
            for name, threads in settings.items():
                torch.set_num_threads(threads)
                started = time.perf_counter()
                rows, _ = asyncio.run(evaluate(engine, problems, config, progress=False))
                seconds[name].append(time.perf_counter() - started)
                tokens[name] = sum(row["tokens"]["generated"] for row in rows)
                print(f"round {r}, {name}: {seconds[name][-1]:.1f} s, {tokens[name]} tokens",
                      flush=True)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    base = medians["1 thread"]
    print(f"\n{args.problems_n} APR solves, context {args.context}, concurrency "
          f"{args.concurrency}, {args.rounds} rounds (medians)")
    print("| torch threads | s | tokens/s | speed vs 1 thread |\n|---|---:|---:|---:|")
    for name, median in medians.items():
        print(f"| {name} | {median:.1f} | {tokens[name] / median:,.0f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()

"""Datagen speed and solve rates on one core, against the reference implementation's figures.

    python bench/datagen_speed.py [--problems 2000] [--seeds 0 1]

Reference figures (the paper's public code, measured on this machine kind, one core):
250 problems/s, 770 APR traces/s, 2,190 SoS+ traces/s; solve rates 70-71% APR with 6.3-6.5
children per problem, 50-51% SoS+, over 2,000 problems. A trace here is searched and rendered
into its threads (prompt and text of every parent segment and child).
"""

from __future__ import annotations

import argparse
import random
import time

from apr.countdown.problems import ProblemSpace, candidates
from apr.countdown.search import apr_search, sos_search
from apr.countdown.threads import apr_threads, sos_threads
from apr.stages.datagen import AprSolverConfig, SosSolverConfig

REFERENCE = {"problems/s": 250.0, "APR traces/s": 770.0, "SoS+ traces/s": 2190.0}


def measure(n: int, seed: int) -> dict[str, float]:
    start = time.perf_counter()
    problems = candidates(ProblemSpace(), seed, 0, n)
    generate = time.perf_counter() - start

    apr_config, sos_config = AprSolverConfig(), SosSolverConfig()
    rng = random.Random(seed)
    solved = children = 0
    start = time.perf_counter()
    for p in problems:
        trace = apr_search(p.nums, p.target, apr_config.draw(rng), rng)
        apr_threads(trace)
        solved += trace.solved
        children += trace.children
    apr_seconds = time.perf_counter() - start

    sos_solved = 0
    start = time.perf_counter()
    for p in problems:
        trace = sos_search(p.nums, p.target, sos_config.draw(rng), rng)
        sos_threads(trace)
        sos_solved += trace.solved
    sos_seconds = time.perf_counter() - start
    return {
        "problems/s": n / generate, "APR traces/s": n / apr_seconds,
        "SoS+ traces/s": n / sos_seconds, "APR solved %": 100 * solved / n,
        "APR children": children / n, "SoS+ solved %": 100 * sos_solved / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    rows = [measure(args.problems, seed) for seed in args.seeds]
    print(f"{'figure':<16}" + "".join(f"{f'seed {s}':>12}" for s in args.seeds)
          + f"{'reference':>12}{'ratio':>8}")
    for key in rows[0]:
        values = [r[key] for r in rows]
        line = f"{key:<16}" + "".join(f"{v:>12.2f}" for v in values)
        if key in REFERENCE:
            mean = sum(values) / len(values)
            line += f"{REFERENCE[key]:>12.0f}{mean / REFERENCE[key]:>7.2f}x"
        print(line)


if __name__ == "__main__":
    main()

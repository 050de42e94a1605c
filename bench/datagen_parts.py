"""Datagen in parts: what N machines save against one, measured on this one.

    python bench/datagen_parts.py [--problems 20000] [--parts 4] [--workers 1]

Writes the whole dataset once; then, as the pipeline does, draws the problems once (its plan
step), writes each of the N parts from them one after another on the same cores (each as a
machine of its own would) and merges them. With N machines the wall time is the plan, the
slowest part and the merge; the ratio against the whole run is the speed-up the pipeline's
`datagen_pods` gives. For comparison, also the parts that each draw the problems themselves
(as before the plan drew them). Prints measured numbers only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from apr.config import load
from apr.stages import datagen, datagen_merge


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=20_000, help="train problems")
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="processes per machine")
    parser.add_argument("--plan-workers", type=int, default=0,
                        help="processes of the plan step, which has a machine to itself (0: "
                        "every core, as in the pipeline)")
    args = parser.parse_args()
    config = load(datagen.DatagenConfig, None, datagen.SECTION, [
        f"problems.train_size={args.problems}", "problems.val_size=1000",
        "problems.test_size=1000", "shard_size=1000", "chunk_size=250",
        f"workers={args.workers}"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        whole = timed(lambda: datagen.run(config, root / "whole", progress=False))
        plan_config = dataclasses.replace(config, workers=args.plan_workers)
        plan = timed(lambda: datagen.draw(plan_config, root / "problems", progress=False))
        parts, drawing = [], []
        for i in range(args.parts):
            part = datagen.Part(i, args.parts)
            parts.append(timed(lambda: datagen.run(config, root / f"part-{i}", progress=False,
                                                   part=part, problems=root / "problems")))
            drawing.append(timed(lambda: datagen.run(config, root / f"drawing-{i}",
                                                     progress=False, part=part)))
        merge = timed(lambda: datagen_merge.merge(
            [root / f"part-{i}" for i in range(args.parts)], root / "merged"))
    machines = plan + max(parts) + merge
    before = max(drawing) + merge
    print(f"problems: {args.problems + 2000:,} ({args.workers} worker(s) per machine)")
    print(f"one machine:          {whole:8.1f} s")
    print(f"plan (the draw, {plan_config.workers or os.cpu_count()} worker(s)): {plan:6.1f} s")
    print(f"each of {args.parts} parts:      " + ", ".join(f"{s:.1f}" for s in parts) + " s")
    print(f"merge:                {merge:8.1f} s")
    print(f"{args.parts} machines (plan + slowest part + merge): {machines:8.1f} s, "
          f"{whole / machines:.2f}x faster (ideal {args.parts}x)")
    print("parts drawing the problems themselves: " + ", ".join(f"{s:.1f}" for s in drawing)
          + f" s; {args.parts} machines {before:.1f} s, {whole / before:.2f}x faster")


if __name__ == "__main__":
    main()

"""Datagen in parts: what N machines save against one, measured on this one.

    python bench/datagen_parts.py [--problems 20000] [--parts 4] [--workers 1]

Writes the whole dataset once, then each of the N parts one after another on the same cores
(each as a machine of its own would), then merges them. With N machines the wall time is the
slowest part plus the merge; the ratio against the whole run is the speed-up the pipeline's
`datagen_pods` gives. Every part draws all the problems (the dedup needs the whole stream),
so the ratio stays above 1/N; this measures by how much. Prints measured numbers only.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    config = load(datagen.DatagenConfig, None, datagen.SECTION, [
        f"problems.train_size={args.problems}", "problems.val_size=1000",
        "problems.test_size=1000", "shard_size=1000", "chunk_size=250",
        f"workers={args.workers}"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        whole = timed(lambda: datagen.run(config, root / "whole", progress=False))
        parts = [timed(lambda i=i: datagen.run(config, root / f"part-{i}", progress=False,
                                                part=datagen.Part(i, args.parts)))
                 for i in range(args.parts)]
        merge = timed(lambda: datagen_merge.merge(
            [root / f"part-{i}" for i in range(args.parts)], root / "merged"))
    slowest = max(parts)
    print(f"problems: {args.problems + 2000:,} ({args.workers} worker(s) per machine)")
    print(f"one machine:          {whole:8.1f} s")
    print(f"each of {args.parts} parts:      " + ", ".join(f"{s:.1f}" for s in parts) + " s")
    print(f"merge:                {merge:8.1f} s")
    print(f"{args.parts} machines (slowest part + merge): {slowest + merge:8.1f} s, "
          f"{whole / (slowest + merge):.2f}x faster (ideal {args.parts}x)")


if __name__ == "__main__":
    main()

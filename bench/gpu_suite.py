"""Every GPU measurement of the project in one call: SFT throughput, decoding speed, and a short
APR and SoS+ SFT of the small shape with an evaluation of each, ending in one table.

    python bench/gpu_suite.py --out runs/gpu-suite.json           (one H100/H200: under 9 minutes)
    python bench/gpu_suite.py --smoke --workdir /tmp/suite         (any CPU: a minute or two)

The parts run in order, each with a time budget (its elapsed seconds are printed and tabled):
1. datagen: the `gpu-small` preset's solvers on 2,000 training and 200 validation problems;
2. SFT throughput (bench/sft_throughput.py) of the paper and small shapes: the dense baseline
   and our loop in both layouts (length buckets, packed rows), eager (and compiled with
   `--compile`, minutes more): tokens/s, MFU, x dense;
3. SFT of the small shape (`gpu-small` settings, one epoch of the same problems, not compiled)
   on APR traces, then on SoS+ traces;
4. decoding (bench/local_decode.py) with the APR model: `generate` with the dynamic and the
   static cache against the runtime's engine steps (spawn cost left out: it decodes serially);
5. evaluation (apr.stages.evaluate, local engine, greedy) of both models on 64 val problems:
   accuracy, children per problem, tokens. Parts 4 and 5 decode in 2,048-token windows.
A part that fails is reported and the rest still run (exit status 1). If `--deadline-s` passes
first, the table so far is printed and the run ends (exit status 3), so one call always returns
numbers. `--smoke` shrinks everything (tiny shape, a few steps and problems, short contexts)
for the test on a CPU. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

STARTED = time.perf_counter()  # the deadline counts the imports below too
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

import local_decode  # noqa: E402
import sft_throughput  # noqa: E402
import torch  # noqa: E402

from apr.config import load  # noqa: E402
from apr.decode.local import LocalEngine  # noqa: E402
from apr.stages import datagen, evaluate, sft  # noqa: E402
from apr.train.data import Sequences, load_sequences  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """How big each part is: sized to an H100's minutes (FULL) or a CPU's seconds (SMOKE)."""

    train: int  # datagen problems
    val: int
    chunk: int  # datagen chunk and shard size
    shard: int
    shapes: tuple[str, ...]  # throughput shapes
    bench_context: int  # throughput sequence limit
    bench_tokens: int  # throughput tokens per batch
    bench_steps: int
    bench_warmup: int
    sft_shape: str
    context: int  # SFT sequence limit
    sft_tokens: int  # SFT tokens per batch
    sft_max_steps: int  # a cap on the one epoch
    sft_warmup: int
    eval_sequences: int  # SFT validation sequences
    decode_context: int  # thread window of the decoding part and the evaluations
    decode_problems: int
    baseline_batch: int
    baseline_tokens: int
    baseline_warmups: int
    eval_problems: int
    budgets: dict[str, float]  # part -> seconds


# On an H100, conservatively: datagen of 2,200 problems (16 cores) ~10 s; throughput, 13 eager
# steps of 65k tokens per variant and shape (the paper shape ~0.5 s a step) after tokenizing
# the APR threads (~15M tokens) ~60 s; the APR SFT (15M tokens, ~500 steps) ~50 s, SoS+ (2M)
# ~20 s; decoding and evaluation are mostly `generate` compiling and 2,048-token threads.
FULL = Sizes(
    train=2000, val=200, chunk=250, shard=25000,
    shapes=("paper", "small"), bench_context=4096, bench_tokens=65536, bench_steps=10,
    bench_warmup=3,
    sft_shape="small", context=4096, sft_tokens=32768, sft_max_steps=2000, sft_warmup=20,
    eval_sequences=500,
    decode_context=2048, decode_problems=32, baseline_batch=64, baseline_tokens=256,
    baseline_warmups=2, eval_problems=64,
    budgets={"datagen": 40, "sft throughput paper": 60, "sft throughput small": 40,
             "sft apr": 80, "sft sos": 40, "decoding": 100, "evaluate apr": 70,
             "evaluate sos": 50})
SMOKE = Sizes(
    train=40, val=16, chunk=8, shard=64,
    shapes=("tiny",), bench_context=256, bench_tokens=1024, bench_steps=2, bench_warmup=1,
    sft_shape="tiny", context=512, sft_tokens=2048, sft_max_steps=2, sft_warmup=1,
    eval_sequences=16,
    decode_context=128, decode_problems=4, baseline_batch=2, baseline_tokens=8,
    baseline_warmups=1, eval_problems=4,
    budgets={"datagen": 10, "sft throughput tiny": 15, "sft apr": 10, "sft sos": 10,
             "decoding": 15, "evaluate apr": 10, "evaluate sos": 10})
STYLE = {"apr": "APR", "sos": "SoS+"}


class Suite:
    """The measurements so far, printable at any moment (the deadline may come mid-part)."""

    def __init__(self, out: Path | None):
        self.out = out
        self.rows: list[dict] = []
        self.failed: dict[str, str] = {}
        self.current = "setup"
        self.started = STARTED
        self.lock = threading.Lock()

    def add(self, part: str, setting: str, metric: str, value: float) -> None:
        self.rows.append({"part": part, "setting": setting, "metric": metric,
                          "value": float(value)})

    def emit(self, complete: bool) -> bool:
        """Print the one table (and write it as JSON when asked): once, whoever comes first."""
        if not self.lock.acquire(blocking=False):
            return False
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        rows = list(self.rows)
        print(f"\ndevice: {device}, torch {torch.__version__}, "
              f"{time.perf_counter() - self.started:.0f} s in all"
              + ("" if complete else f" (stopped at the deadline during {self.current})"))
        print("| part | setting | metric | value |\n|---|---|---|---:|")
        for r in rows:
            print(f"| {r['part']} | {r['setting']} | {r['metric']} | {r['value']:,.4g} |")
        for part, error in self.failed.items():
            print(f"FAILED {part}: {error}")
        sys.stdout.flush()
        if self.out is not None:
            record = {"device": device, "torch": torch.__version__, "complete": complete,
                      "failed": self.failed, "rows": rows}
            partial = self.out.with_name(self.out.name + ".partial")
            partial.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(partial, self.out)
        return True

    def run(self, name: str, budget: float, part: Callable[[], None]) -> None:
        """One part: timed against its budget; a failure is recorded and the suite goes on."""
        self.current = name
        print(f"[suite] {name} (budget {budget:.0f} s) ...", flush=True)
        started = time.perf_counter()
        try:
            part()
        except Exception as e:  # noqa: BLE001 - one broken part must not cost the others
            traceback.print_exc()
            self.failed[name] = f"{type(e).__name__}: {e}".splitlines()[0]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        seconds = time.perf_counter() - started
        print(f"[suite] {name}: {seconds:.1f} s"
              + (" (over budget)" if seconds > budget else ""), flush=True)
        self.add("time", f"{name} (budget {budget:.0f} s)", "elapsed s", seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/gpu-suite"),
                        help="where data, models and evaluations go (must be new or empty)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    parser.add_argument("--smoke", action="store_true", help="everything tiny, for a CPU test")
    parser.add_argument("--peak-tflops", type=positive, default=783.0,
                        help="the accelerator's measured bf16 peak, for MFU (H100: 783)")
    parser.add_argument("--compile", action="store_true",
                        help="also time compiled throughput variants (minutes more)")
    parser.add_argument("--deadline-s", type=positive, default=540.0,
                        help="print the table so far and stop this many seconds after the start")
    args = parser.parse_args(argv)
    if args.workdir.exists() and (not args.workdir.is_dir() or any(args.workdir.iterdir())):
        parser.error(f"--workdir {args.workdir} is not empty: remove it or choose another")
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out} is a directory: give a file name")
    sizes = SMOKE if args.smoke else FULL
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.out)

    def at_deadline() -> None:
        if suite.emit(complete=False):  # else the finished table is being printed
            os._exit(3)

    watchdog = threading.Timer(args.deadline_s - (time.perf_counter() - STARTED), at_deadline)
    watchdog.daemon = True
    watchdog.start()

    # Datagen forks its workers: before anything initialises CUDA in this process.
    suite.run("datagen", sizes.budgets["datagen"], lambda: make_data(suite, sizes, work / "data"))

    @cache
    def apr_train() -> Sequences:
        return load_sequences(work / "data", "apr", "train", "all", sizes.bench_context)

    for shape in sizes.shapes:
        name = f"sft throughput {shape}"
        suite.run(name, sizes.budgets[name],
                  lambda shape=shape: throughput(suite, sizes, shape, apr_train(),
                                                 args.peak_tflops, args.compile))
    apr_train.cache_clear()
    for style in ("apr", "sos"):
        suite.run(f"sft {style}", sizes.budgets[f"sft {style}"],
                  lambda style=style: train(suite, sizes, style, work, args.peak_tflops))
    suite.run("decoding", sizes.budgets["decoding"], lambda: decoding(suite, sizes, work))
    for style in ("apr", "sos"):
        suite.run(f"evaluate {style}", sizes.budgets[f"evaluate {style}"],
                  lambda style=style: evaluation(suite, sizes, style, work))
    watchdog.cancel()
    suite.add("time", "whole suite", "elapsed s", time.perf_counter() - suite.started)
    suite.emit(complete=True)
    return 1 if suite.failed else 0


def positive(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
    return value


# --- the parts ----------------------------------------------------------------------------
def make_data(suite: Suite, sizes: Sizes, out: Path) -> None:
    config = load(datagen.DatagenConfig, "gpu-small", "datagen", [
        f"problems.train_size={sizes.train}", f"problems.val_size={sizes.val}",
        "problems.test_size=0", f"chunk_size={sizes.chunk}", f"shard_size={sizes.shard}"])
    stats = datagen.run(config, out, progress=False)
    setting = f"gpu-small solvers, {sizes.train} train problems"
    train = stats["splits"]["train"]
    suite.add("datagen", setting, "problems/s", stats["problems_per_second"])
    suite.add("datagen", setting, "APR solve rate", train["apr"]["solve_rate"])
    suite.add("datagen", setting, "APR children/problem", train["apr"]["children_per_problem"])
    suite.add("datagen", setting, "SoS+ solve rate", train["sos"]["solve_rate"])


def throughput(suite: Suite, sizes: Sizes, shape: str, seqs: Sequences, peak: float,
               compile: bool) -> None:
    rows = sft_throughput.measure(seqs, shape, sizes.bench_context, sizes.bench_tokens,
                                  steps=sizes.bench_steps, warmup=sizes.bench_warmup,
                                  compile=compile)
    base = rows[0].tokens_per_s
    for row in rows:
        setting = f"{shape}: {row.variant}"
        suite.add("sft throughput", setting, "tokens/s", row.tokens_per_s)
        suite.add("sft throughput", setting, "MFU", row.tflops / peak)
        suite.add("sft throughput", setting, "x dense", row.tokens_per_s / base)


def train(suite: Suite, sizes: Sizes, style: str, work: Path, peak: float) -> None:
    config = load(sft.SFTConfig, "gpu-small", "sft", [
        f"shape={sizes.sft_shape}", f"traces={style}", f"context={sizes.context}",
        f"tokens_per_batch={sizes.sft_tokens}", f"max_steps={sizes.sft_max_steps}",
        "epochs=1.0", f"warmup_steps={sizes.sft_warmup}", f"eval_sequences={sizes.eval_sequences}",
        "eval_every=100000", "checkpoint_every=100000", "log_every=50", "compile=false",
        "dtype=auto", f"peak_tflops={peak}"])
    result = sft.run(config, work / "data", work / f"sft-{style}", progress=False)
    logged = [json.loads(line) for line in
              (work / f"sft-{style}" / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in logged if "tokens_per_s" in r]
    setting = f"{STYLE[style]} traces, {sizes.sft_shape} shape, {result.steps} steps"
    suite.add("sft", setting, "train loss", result.final_train_loss)
    suite.add("sft", setting, "val loss", result.val_loss)
    suite.add("sft", setting, "train sequences", result.train_sequences)
    if rates:  # the last window's rate: past the first steps' warm-up
        suite.add("sft", setting, "tokens/s", rates[-1]["tokens_per_s"])
        suite.add("sft", setting, "MFU", rates[-1].get("mfu", 0.0))


def decoding(suite: Suite, sizes: Sizes, work: Path) -> None:
    engine = LocalEngine(work / "sft-apr" / "model")
    m = local_decode.measure(engine, str(work / "data"), sizes.decode_problems,
                             sizes.decode_context, sizes.baseline_batch, sizes.baseline_tokens,
                             sizes.baseline_warmups, k_children=0)
    del engine
    batch = f"batch {m.baseline_batch}, 64 + {sizes.baseline_tokens} tokens"
    suite.add("decoding", f"generate, dynamic cache, {batch}", "ms/step", m.base_ms[False])
    suite.add("decoding", f"generate, static cache, {batch}", "ms/step", m.base_ms[True])
    setting = (f"runtime ({m.stats.batches} batches of {m.stats.rows / m.stats.batches:.1f} rows), "
               f"{m.solves} APR solves, context {sizes.decode_context}")
    suite.add("decoding", setting, "ms/step", m.runtime_ms)
    suite.add("decoding", setting, "x static generate", m.runtime_ms / m.base_ms[True])
    suite.add("decoding", setting, "engine idle share", m.idle_share)
    suite.add("decoding", setting, "wall s", m.wall_s)
    suite.add("decoding", setting, "accuracy", m.accuracy)


def evaluation(suite: Suite, sizes: Sizes, style: str, work: Path) -> None:
    config = load(evaluate.EvalConfig, "gpu-small", "evaluate", [
        "engine=local", f"modes=[{style}]", f"max_problems={sizes.eval_problems}",
        f"context={sizes.decode_context}", "apr_budgets=[0]", "sos_samples=[1]",
        f"context_limits=[{sizes.decode_context}]", f"concurrency={sizes.eval_problems}"])
    metrics = evaluate.run(config, work / f"sft-{style}" / "model", work / "data",
                           work / f"eval-{style}", progress=False)
    m = metrics["settings"][style]
    setting = f"{STYLE[style]}, {m['problems']} val problems, context {sizes.decode_context}"
    suite.add("evaluate", setting, "accuracy", m["accuracy"])
    suite.add("evaluate", setting, "children/problem", m["children_per_problem"])
    suite.add("evaluate", setting, "tokens/problem", m["tokens_total"]["mean"])
    suite.add("evaluate", setting, "sequential tokens/problem", m["tokens_sequential"]["mean"])
    suite.add("evaluate", setting, "wall s", metrics["seconds"])


if __name__ == "__main__":
    sys.exit(main())

"""The same APR evaluation through three engines: the local engine in process, the same engine
behind HTTP (`apr engine serve`), and real SGLang on the CPU (`make sglang`).

    python bench/engines.py --model runs/grpo-bench/sft/model --problems runs/grpo-bench/data \
        --n 100 --context 512 --repeats 3

Each engine is loaded once (its server started once); the runs are interleaved (local,
engine-serve, sglang, local, ...) so that the machine's noise falls on all of them alike.
Greedy and sampled (temperature 1.0). Prints, per engine and decoding, the median wall time,
problems/s, generated tokens/s, the ratio of its time to the local engine's, and, greedy, on
how many problems its results (solution, failures, children, tokens) equal the local engine's.
Servers are started with the project's own launcher, as a GRPO run starts its rollout server.
A server not being measured is stopped with SIGSTOP: SGLang's idle scheduler polls, and would
take a core from the engine being timed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from apr.config import from_dict
from apr.dataset import load_problems
from apr.decode.local import LocalEngine
from apr.decode.rollout_server import (
    ENGINE_SERVE,
    MAKE_SGLANG_PYTHON,
    SGLANG_PYTHON_ENV,
    RolloutServer,
)
from apr.decode.sglang import SGLangEngine
from apr.stages.evaluate import EvalConfig, evaluate

ENGINES = ("local", ENGINE_SERVE, "sglang")


def eval_config(context: int, temperature: float) -> EvalConfig:
    return from_dict(EvalConfig, {"modes": ["apr"], "context": context,
                                  "temperature": temperature, "context_limits": [context],
                                  "total_token_limits": [context]}, "evaluate")


async def one_run(engine_name: str, local: LocalEngine, urls: dict[str, str],
                  problems: list[dict], config: EvalConfig) -> tuple[float, list[dict]]:
    """Wall seconds and rows of one evaluation (an HTTP client per run: its pool belongs to
    this run's event loop)."""
    engine = local if engine_name == "local" else SGLangEngine(urls[engine_name])
    started = time.perf_counter()
    try:
        rows, _ = await evaluate(engine, problems, config, progress=False)
    finally:
        if engine is not local:
            await engine.close()
    return time.perf_counter() - started, rows


def freeze(server: RolloutServer | None, frozen: bool) -> None:
    """SIGSTOP / SIGCONT to the server's whole process group (SGLang's scheduler included)."""
    if server is not None and server.process is not None:
        os.killpg(server.process.pid, signal.SIGSTOP if frozen else signal.SIGCONT)


def answers(rows: list[dict]) -> dict[str, tuple]:
    return {r["id"]: (r["solution"], r["failures"], r["children"], r["tokens"]) for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained model directory")
    parser.add_argument("--problems", required=True, help="an `apr datagen` output")
    parser.add_argument("--n", type=int, default=100, help="val problems")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    parser.add_argument("--sglang-python", default=os.environ.get(SGLANG_PYTHON_ENV) or
                        MAKE_SGLANG_PYTHON, help="SGLang's interpreter")
    args = parser.parse_args()
    if "sglang" in args.engines and not Path(args.sglang_python).is_file():
        parser.error(f"no SGLang at {args.sglang_python}: run `make sglang` or drop sglang "
                     "from --engines")

    problems = load_problems(args.problems, "val", args.n)
    local = LocalEngine(args.model, device="cpu")
    servers: dict[str, RolloutServer] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    try:
        urls = {}
        for kind in (e for e in args.engines if e != "local"):
            server = RolloutServer(args.model, logs / f"{kind}.log", kind=kind, device="cpu",
                                   python=args.sglang_python if kind == "sglang" else "",
                                   startup_timeout_s=600).start()
            servers[kind] = server
            urls[kind] = server.url
            freeze(server, True)
        print(f"{len(problems)} val problems, context {args.context}, {args.repeats} "
              f"interleaved runs; server logs in {logs}")
        for temperature in args.temperatures:
            config = eval_config(args.context, temperature)
            walls: dict[str, list[float]] = {e: [] for e in args.engines}
            rows: dict[str, list[dict]] = {}
            steps_before = (local.stats.steps, local.stats.busy_s)
            for _ in range(args.repeats):
                for name in args.engines:
                    freeze(servers.get(name), False)
                    wall, rows[name] = asyncio.run(one_run(name, local, urls, problems, config))
                    freeze(servers.get(name), True)
                    walls[name].append(wall)
            report(temperature, walls, rows, local, steps_before, args.repeats)
    finally:
        for server in servers.values():
            freeze(server, False)
            server.stop()


def report(temperature: float, walls: dict[str, list[float]], rows: dict[str, list[dict]],
           local: LocalEngine, steps_before: tuple[int, float], repeats: int) -> None:
    reference = answers(rows["local"]) if "local" in rows else None
    base = statistics.median(walls["local"]) if "local" in walls else None
    print(f"\ntemperature {temperature}:")
    print("| engine | median wall s | runs (s) | problems/s | generated tokens/s | time / local "
          "| same results as local | accuracy | children / problem |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, times in walls.items():
        median = statistics.median(times)
        generated = sum(r["tokens"]["generated"] for r in rows[name])
        same = "" if reference is None or temperature > 0 else \
            f"{sum(reference[k] == v for k, v in answers(rows[name]).items())}/{len(reference)}"
        n = len(rows[name])
        ratio = f"{median / base:.2f}" if base else ""
        print(f"| {name} | {median:.2f} | {', '.join(f'{t:.1f}' for t in times)} | "
              f"{n / median:.2f} | {generated / median:.0f} | {ratio} | {same} | "
              f"{sum(r['correct'] for r in rows[name]) / n:.3f} | "
              f"{sum(r['children'] for r in rows[name]) / n:.2f} |")
    steps = local.stats.steps - steps_before[0]
    if steps:
        busy = local.stats.busy_s - steps_before[1]
        print(f"local engine: {1000 * busy / steps:.1f} ms per decode step (its batches, "
              f"{steps // repeats} steps a run)")


if __name__ == "__main__":
    main()

"""The evaluation stage: APR at several child budgets against SoS+ at several token budgets and
sample counts.

    apr evaluate --config local --model runs/x/sft-apr/model --problems runs/x/data \
        --out runs/x/eval-apr

Every answer is checked by the verifier, never by the model's claim. With `engine: sglang` and
`server: sglang` (or `auto`: SGLang when it is installed and a GPU is present, else `apr
engine serve`), the server is started on the model beside the evaluation and stopped after
it: the cluster's evaluation step needs no server of its own (the paper preset). Writes
`results.jsonl` (one row per problem and setting), `metrics.json`, the paper's three curves
as PNG (accuracy against context-window limit, total tokens and latency) and `report.md`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from apr import atomic
from apr.config import InputError, check, check_choice, check_range, dump, option
from apr.countdown.threads import APR, SOS, STYLES
from apr.dataset import load_problems
from apr.decode.runtime import Budgets, Solve, Vote, sample
from apr.summary import describe

SECTION = "evaluate"
log = logging.getLogger(__name__)
ENGINES = ("local", "sglang", "oracle")  # sglang: SGLang or `apr engine serve` at engine_url
# apr.decode.rollout_server.KINDS (a test keeps them equal), not imported: that module needs
# httpx, which an evaluation on the local engine does not.
SERVER_KINDS = ("auto", "sglang", "engine-serve")


@dataclass
class EvalConfig:
    engine: str = option("local", "local (in process), sglang (HTTP at engine_url), oracle")
    engine_url: str = option("", "the server's URL for engine sglang, e.g. http://127.0.0.1:30000")
    server: str = option("", "engine sglang: start this server on the model beside the "
                             "evaluation and decode through it (sglang, engine-serve, or auto: "
                             "SGLang with a GPU and SGLang installed); empty: use engine_url")
    server_startup_s: float = option(600.0, "how long the started server may take to load")
    split: str = option("val", "the problems' split to evaluate on")
    max_problems: int = option(1000, "evaluate the first N problems of the split")
    context: int = option(4096, "the thread context window the model decodes in")
    total_tokens: int = option(0, "tokens one solve (each sample) may spend in all its contexts, "
                                  "every setting; once spent the parent is cut (0: no limit)")
    apr_budgets: list[int] = option(factory=lambda: [0], doc="APR settings: `Sub Call Budget` "
                                    "prefixes (0: no prefix)")
    sos_samples: list[int] = option(factory=lambda: [1], doc="SoS+ settings: N of best-of-N "
                                    "and majority")
    sos_token_budgets: list[int] = option(factory=lambda: [0], doc="SoS+ settings: `Token "
                                          "Budget` prefixes (0: no prefix), each at every N")
    temperature: float = option(0.0, "for single samples; several samples use "
                                     "sample_temperature")
    sample_temperature: float = option(1.0, "for settings with several samples (SoS+ N > 1)")
    context_limits: list[int] = option(factory=lambda: [512, 1024, 1536, 2048, 3072, 4096],
                                       doc="context windows C of the accuracy-at-C curve")
    total_token_limits: list[int] = option(factory=lambda: [1024, 2048, 4096, 8192, 16384],
                                           doc="total-token budgets T of the accuracy-at-T curve")
    concurrency: int = option(64, "problems decoded at once (they share engine batches)")
    modes: list[str] = option(factory=lambda: [APR, SOS], doc="methods to evaluate: apr, sos")

    def validate(self) -> None:
        check_choice("engine", self.engine, ENGINES)
        check(self.engine != "sglang" or bool(self.engine_url or self.server), "engine_url",
              f"engine {self.engine!r} needs the server's URL, e.g. http://127.0.0.1:30000, "
              "or server: sglang to start one here")
        check(not self.server or self.engine == "sglang", "server",
              f"a server is started only for engine sglang, not {self.engine!r}")
        check(not self.server or self.server in SERVER_KINDS, "server",
              f"{self.server!r}: choose one of {', '.join(SERVER_KINDS)}")
        check_range("server_startup_s", self.server_startup_s, 1.0)
        check_range("max_problems", self.max_problems, 1)
        check_range("context", self.context, 16)
        check_range("total_tokens", self.total_tokens, 0)
        check_range("concurrency", self.concurrency, 1)
        check(all(b >= 0 for b in self.apr_budgets), "apr_budgets", "budgets must be >= 0")
        check(all(n >= 1 for n in self.sos_samples), "sos_samples", "sample counts must be >= 1")
        check(all(t >= 0 for t in self.sos_token_budgets), "sos_token_budgets",
              "budgets must be >= 0")
        check(bool(self.modes) and all(m in STYLES for m in self.modes), "modes",
              f"a non-empty list of {APR!r} and {SOS!r}")
        check_range("temperature", self.temperature, 0.0)
        check_range("sample_temperature", self.sample_temperature, 0.0)
        check(all(c >= 1 for c in self.context_limits), "context_limits",
              "context windows must be >= 1")
        check(all(t >= 1 for t in self.total_token_limits), "total_token_limits",
              "total-token budgets must be >= 1")


@dataclass(frozen=True)
class Setting:
    mode: str
    budget: int = 0  # the prompt's budget prefix: APR `Sub Call Budget`, SoS+ `Token Budget`
    samples: int = 1

    @property
    def name(self) -> str:
        return (self.mode + (f"-budget{self.budget}" if self.budget else "")
                + (f"-n{self.samples}" if self.samples > 1 else ""))


def settings(config: EvalConfig) -> list[Setting]:
    out = []
    if APR in config.modes:
        out += [Setting(APR, budget=b) for b in config.apr_budgets]
    if SOS in config.modes:
        out += [Setting(SOS, budget=t, samples=n)
                for t in config.sos_token_budgets for n in config.sos_samples]
    return out


# --- metrics: pure functions of result rows ------------------------------------------------
def summarize(rows: list[dict], context_limits: Sequence[int],
              total_token_limits: Sequence[int] = ()) -> dict:
    """Metrics of one setting from its result rows (one row per problem).

    A row: correct, majority (SoS+ with N > 1), children, failures (list of kinds), and per
    problem the summed tokens {total, generated, sequential} over its samples, the longest
    context any of its threads used, and wall_s.
    """
    n = len(rows)
    failures = Counter(kind for r in rows for kind in r["failures"])
    out = {
        "problems": n,
        "accuracy": round(sum(r["correct"] for r in rows) / n, 4) if n else 0.0,
        "children_per_problem": round(sum(r["children"] for r in rows) / n, 3) if n else 0.0,
        "tokens_total": describe([r["tokens"]["total"] for r in rows]),
        "tokens_generated": describe([r["tokens"]["generated"] for r in rows]),
        "tokens_sequential": describe([r["tokens"]["sequential"] for r in rows]),
        "longest_context": describe([r["tokens"]["longest_context"] for r in rows]),
        "latency_s": describe([r["wall_s"] for r in rows]),
        "failures": dict(sorted(failures.items())),
        # A solve whose longest thread needed more than C tokens fails in a C-token window.
        "accuracy_at_context": {str(c): round(sum(r["correct"] and r["tokens"]["longest_context"] <= c
                                                   for r in rows) / n, 4) if n else 0.0
                                for c in context_limits},
        # Likewise a problem whose tokens in all contexts (its samples summed) passed T fails
        # under a total budget of T. A lower bound, like the context curve: the runtime under
        # `total_tokens: T` follows the unlimited run until it passes T, so one sample scores
        # at least this (more only when a cut at T drops nothing but the final EOS), and a
        # model that knew its budget could plan for it.
        "accuracy_at_total_tokens": {str(t): round(sum(r["correct"] and r["tokens"]["total"] <= t
                                                        for r in rows) / n, 4) if n else 0.0
                                     for t in total_token_limits},
    }
    if any("majority" in r for r in rows):
        out["majority_accuracy"] = round(sum(r.get("majority", False) for r in rows) / n, 4)
    return out


def row(problem: dict, setting: Setting, vote: Vote) -> dict:
    samples = vote.samples
    return {
        "id": problem["id"], "setting": setting.name, "nums": problem["nums"],
        "target": problem["target"],
        "correct": vote.best_of_n, **({"majority": vote.majority} if len(samples) > 1 else {}),
        "solution": next((s.solution for s in samples if s.correct), samples[0].solution),
        "failures": [s.failure for s in samples if s.failure],
        "children": sum(s.children for s in samples),
        "tokens": {"total": sum(s.tokens_total for s in samples),
                   "generated": sum(s.tokens_generated for s in samples),
                   "sequential": max(s.tokens_sequential for s in samples),
                   "longest_context": max(s.longest_context for s in samples)},
        "wall_s": round(max(s.wall_s for s in samples), 4),
        "engine_calls": sum(s.engine_calls for s in samples),
    }


# --- the stage --------------------------------------------------------------------------
def make_engine(config: EvalConfig, model: str | Path | None, problems: str | Path,
                engine_url: str = ""):
    if config.engine == "oracle":
        from apr.dataset import read_records
        from apr.decode.oracle import OracleEngine

        return OracleEngine(list(read_records(problems, APR, config.split))
                            + list(read_records(problems, SOS, config.split)))
    if config.engine == "sglang":
        from apr.decode.sglang import SGLangEngine

        return SGLangEngine(engine_url or config.engine_url)
    if model is None:
        raise InputError(f"engine {config.engine} needs --model (a model directory)")
    from apr.decode.local import LocalEngine
    from apr.model import positions

    if config.context > (limit := positions(model)):
        raise InputError(f"evaluate.context: {config.context} is beyond the {limit} positions of "
                         f"{model}: set it to {limit} or less")

    return LocalEngine(model)


async def evaluate(engine, problems: list[dict], config: EvalConfig, progress: bool = True
                   ) -> tuple[list[dict], dict[str, dict]]:
    """Every (problem, setting) solved; the result rows and one solved example per setting."""
    from tqdm import tqdm

    gate = asyncio.Semaphore(config.concurrency)
    work = [(p, s) for s in settings(config) for p in problems]
    bar = tqdm(total=len(work), desc="evaluate", unit="solve", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)

    async def one(problem: dict, setting: Setting) -> dict:
        budgets = Budgets(context=config.context, total_tokens=config.total_tokens,
                          sub_call_budget=setting.budget if setting.mode == APR else 0,
                          token_budget=setting.budget if setting.mode == SOS else 0)
        temperature = config.temperature if setting.samples == 1 else config.sample_temperature
        async with gate:
            vote = await sample(engine, setting.mode, problem["nums"], problem["target"],
                                setting.samples, budgets, temperature)
        bar.update(1)
        return row(problem, setting, vote), vote

    done = await asyncio.gather(*(one(p, s) for p, s in work))
    bar.close()
    return [r for r, _ in done], examples(done)


def examples(done: list[tuple[dict, Vote]]) -> dict[str, dict]:
    """One solved solve per setting, its threads kept for the report to show: the first
    (in problem order) that spawned children, else the first solved. Only these keep their
    text; results.jsonl has the numbers of every solve."""
    chosen: dict[str, tuple[int, dict, Solve]] = {}
    for r, vote in done:
        solved = next((s for s in vote.samples if s.correct), None)
        if solved is None:
            continue
        rank = 0 if solved.children else 1
        if r["setting"] not in chosen or rank < chosen[r["setting"]][0]:
            chosen[r["setting"]] = (rank, r, solved)
    return {name: {"id": r["id"], "nums": r["nums"], "target": r["target"],
                   "solution": solved.solution, "children": solved.children,
                   "threads": [t.to_json() for t in solved.threads]}
            for name, (_, r, solved) in chosen.items()}


def _model_label(config: EvalConfig, model: str | Path | None) -> str:
    """The model in words for the report (its training stage and step), or the engine."""
    if config.engine == "oracle":
        return "the solver's own traces (oracle)"
    if model is None or (config.engine == "sglang" and not config.server):
        return f"the model served at {config.engine_url}"
    from apr import model as model_lib

    return model_lib.describe(model)


@contextlib.contextmanager
def _server(config: EvalConfig, model: str | Path | None) -> Iterator[str]:
    """The URL of the server `config.server` names, started on `model` for the evaluation
    and stopped after it (its log in a temporary directory, quoted if it fails); "" without."""
    if not config.server:
        yield ""
        return
    if model is None:
        raise InputError(f"server {config.server} needs --model (the model it serves)")
    import tempfile

    from apr.decode.rollout_server import RolloutServer

    with tempfile.TemporaryDirectory(prefix="apr-eval-server-") as logs, \
            RolloutServer(model, Path(logs) / "server.log", config.server,
                          startup_timeout_s=config.server_startup_s) as server:
        log.info("%s server on %s at %s", server.kind, model, server.url)
        yield server.url


def run(config: EvalConfig, model: str | Path | None, problems: str | Path, out: str | Path,
        progress: bool = True) -> dict:
    out = Path(out)
    atomic.check_replaceable(out, "metrics.json")  # before the work, not after it
    rows_in = load_problems(problems, config.split, config.max_problems)
    with _server(config, model) as url:
        engine = make_engine(config, model, problems, url)
        started = time.perf_counter()

        async def main() -> tuple[list[dict], dict[str, dict]]:
            try:
                return await evaluate(engine, rows_in, config, progress)
            finally:
                await engine.close()

        rows, solved = asyncio.run(main())
        seconds = time.perf_counter() - started
    by_setting: dict[str, list[dict]] = {}
    for r in rows:
        by_setting.setdefault(r["setting"], []).append(r)
    metrics = {
        "engine": config.engine, "model": str(model) if model else None,
        "model_label": _model_label(config, model),
        "problems": len(rows_in), "split": config.split, "context": config.context,
        "total_tokens": config.total_tokens, "seconds": round(seconds, 2),
        "settings": {name: summarize(rs, config.context_limits, config.total_token_limits)
                     | ({"example": solved[name]} if name in solved else {})
                     for name, rs in by_setting.items()},
    }
    from apr.report import write_plots, write_report

    with atomic.partial_dir(out, replace="metrics.json") as partial:
        with open(partial / "results.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        (partial / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (partial / "config.yaml").write_text(dump(config, SECTION))
        write_plots(metrics, partial)
        write_report(metrics, partial)
    return metrics

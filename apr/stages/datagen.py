"""The datagen stage: problems, SoS+ and APR traces, the tokenizer and stats, on every core.

    apr datagen --config local --out runs/local/data [--set problems.train_size=1000]

Output (written under `<out>.partial/`, renamed to `<out>` only when complete):
    problems/{val,test,train}.jsonl    id, nums, target, solution
    traces/{apr,sos}/{split}-NNNNN.jsonl[.gz]   one record per problem, with every thread
    tokenizer/                          tokenizer.json + config (AutoTokenizer, SGLang)
    stats.json, config.yaml
The same config gives byte-identical files whatever the number of worker processes.

At scale the traces split over machines: `apr datagen --part I/N` writes part I of N (the
problems, the tokenizer and every N-th trace file, from file I on, with the numbers behind
stats.json in `metrics/`), and `apr datagen-merge` joins the N parts into the dataset one
machine would have written, byte for byte (apr/stages/datagen_merge.py). The problems are
drawn once, before the parts: `apr datagen --problems-only` writes a problem set, and each
`apr datagen --part I/N --problems SET` reads it instead of drawing the whole stream again.
"""

from __future__ import annotations

import array
import gzip
import json
import math
import multiprocessing
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from apr import __version__, atomic, tokenizer
from apr.config import (
    InputError,
    check,
    check_choice,
    check_range,
    dump,
    option,
    to_dict,
)
from apr.countdown.problems import SPLITS, Problem, ProblemSpace, candidates
from apr.countdown.search import HEURISTICS, SearchParams, apr_search, sos_search
from apr.countdown.threads import apr_threads, final_text, sos_threads
from apr.countdown.trace import SUB_CALL_BUDGET, TOKEN_BUDGET, Budget, token_budget
from apr.datagen_parts import (
    METRICS,
    PART_FILE,
    WHOLE,
    Part,
    concatenate,
    read_marker,
    summarize,
)
from apr.resources import check_fits

SECTION = "datagen"
COMPRESSIONS = ("none", "gzip")
PROBLEM_BYTES = 2048  # a drawn problem held until its split is written (2.1 KB measured)
PROBLEM_SET_FILE = "problems.json"  # marks the problems drawn alone (`--problems-only`)


@dataclass
class ProblemsConfig:
    """Countdown problems (paper: 4 numbers in 1..99, targets 10..100, 500k train, 1k val)."""

    n_numbers: int = option(4, "numbers in each problem (paper: 4), from 2 to 6")
    num_min: int = option(1, "smallest number drawn (paper: 1)")
    num_max: int = option(99, "largest number drawn (paper: 99)")
    target_min: int = option(10, "smallest target (paper: 10)")
    target_max: int = option(100, "largest target (paper: 100)")
    train_size: int = option(500_000, "training problems (paper: 500k)")
    val_size: int = option(1_000, "validation problems (paper: 1k)")
    test_size: int = option(1_000, "test problems, kept apart from train and val")
    seed: int = option(0, "seed of the problem draw: the same seed gives the same problems")

    def validate(self) -> None:
        check_range("n_numbers", self.n_numbers, 2, 6)
        check_range("num_min", self.num_min, 1)
        check(self.num_max >= self.num_min, "num_max",
              f"{self.num_max} is below num_min {self.num_min}: the number range is empty")
        check_range("target_min", self.target_min, 2)
        check(self.target_max >= self.target_min, "target_max",
              f"{self.target_max} is below target_min {self.target_min}: the target range is empty")
        for key in ("train_size", "val_size", "test_size"):
            check_range(key, getattr(self, key), 0)
        distinct = math.comb(self.num_max - self.num_min + self.n_numbers, self.n_numbers) * (
            self.target_max - self.target_min + 1)  # multisets of numbers, times targets
        asked = sum(self.sizes().values())
        check(asked <= distinct, "train_size", f"{asked:,} problems asked for in all, but this "
              f"space holds at most {distinct:,} distinct ones: ask for fewer or widen the ranges")

    def space(self) -> ProblemSpace:
        return ProblemSpace(self.n_numbers, self.num_min, self.num_max, self.target_min,
                            self.target_max)

    def sizes(self) -> dict[str, int]:
        return {"val": self.val_size, "test": self.test_size, "train": self.train_size}


@dataclass
class AprSolverConfig:
    """APR data (paper: beam 1..10, child beam beam..15, promising 0.9, mult heuristic)."""

    beam_min: int = option(1, "smallest beam width drawn per problem (paper: 1)")
    beam_max: int = option(10, "largest beam width drawn per problem (paper: 10)")
    sub_beam_max: int = option(15, "a child's beam is drawn from beam..sub_beam_max (paper: 15)")
    promising_threshold: float = option(
        0.9, "chance that an expansion of the parent spawns children for its nodes (paper: 0.9)")
    heuristic: str = option("mult", "search heuristic: mult (the paper's) or sum")
    budget_prefix: bool = option(
        False, "start parent prompts with `Sub Call Budget: N `, N = the trace's child count "
        "(paper §4.3)")

    def validate(self) -> None:
        check_range("beam_min", self.beam_min, 1)
        check(self.beam_max >= self.beam_min, "beam_max", f"must be >= beam_min {self.beam_min}")
        check(self.sub_beam_max >= self.beam_max, "sub_beam_max",
              f"must be >= beam_max {self.beam_max}")
        check_range("promising_threshold", self.promising_threshold, 0.0, 1.0)
        check_choice("heuristic", self.heuristic, HEURISTICS)

    def draw(self, rng: random.Random) -> SearchParams:
        beam = rng.randint(self.beam_min, self.beam_max)
        return SearchParams(beam, self.heuristic, self.promising_threshold,
                            rng.randint(beam, self.sub_beam_max))


@dataclass
class SosSolverConfig:
    """SoS+ data (paper's code: beam 1..5, promising 0.5, mult heuristic)."""

    beam_min: int = option(1, "smallest beam width drawn per problem (paper's code: 1)")
    beam_max: int = option(5, "largest beam width drawn per problem (paper's code: 5)")
    promising_threshold: float = option(
        0.5, "chance that an expansion dives depth-first into its nodes (paper's code: 0.5)")
    heuristic: str = option("mult", "search heuristic: mult (the paper's) or sum")
    budget_prefix: bool = option(
        False, "start prompts with `Token Budget: N `, N = the trace's tokens rounded up to 512")

    def validate(self) -> None:
        check_range("beam_min", self.beam_min, 1)
        check(self.beam_max >= self.beam_min, "beam_max", f"must be >= beam_min {self.beam_min}")
        check_range("promising_threshold", self.promising_threshold, 0.0, 1.0)
        check_choice("heuristic", self.heuristic, HEURISTICS)

    def draw(self, rng: random.Random) -> SearchParams:
        return SearchParams(rng.randint(self.beam_min, self.beam_max), self.heuristic,
                            self.promising_threshold)


@dataclass
class DatagenConfig:
    problems: ProblemsConfig = option(factory=ProblemsConfig, doc="the Countdown problems drawn")
    apr: AprSolverConfig = option(factory=AprSolverConfig,
                                  doc="the solver that writes APR traces (parent and children)")
    sos: SosSolverConfig = option(factory=SosSolverConfig,
                                  doc="the solver that writes SoS+ traces (one serial thread)")
    workers: int = option(0, "worker processes; 0 = every core (the output does not depend on it)")
    shard_size: int = option(50_000, "problems per trace shard; a multiple of chunk_size")
    chunk_size: int = option(250, "problems per unit of work (shards are cut on chunk boundaries)")
    compression: str = option("none", 'trace shards: "none" (.jsonl) or "gzip" (.jsonl.gz)')
    token_stats_sample: int = option(
        20_000, "token lengths for stats are measured on about this many problems (0: none)")

    def validate(self) -> None:
        check_range("workers", self.workers, 0)
        check_range("chunk_size", self.chunk_size, 1)
        check_range("shard_size", self.shard_size, 1)
        check(self.shard_size % self.chunk_size == 0, "shard_size",
              f"{self.shard_size} must be a multiple of chunk_size {self.chunk_size}")
        check_choice("compression", self.compression, COMPRESSIONS)
        check_range("token_stats_sample", self.token_stats_sample, 0)


# --- work done in the worker processes ------------------------------------------------------
def _problem_chunk(args: tuple[ProblemSpace, int, int, int]) -> list[Problem]:
    return candidates(*args)


@dataclass
class ChunkResult:
    apr: bytes
    sos: bytes
    metrics: dict[str, list[int]]


def _encode(records: list[dict], compression: str) -> bytes:
    data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
    return gzip.compress(data, compresslevel=1, mtime=0) if compression == "gzip" else data


def solve(problem: Problem, config: DatagenConfig, measure_tokens: bool
          ) -> tuple[dict, dict, dict[str, int]]:
    """Both traces of one problem, as JSON records, and the numbers `stats.json` is made of."""
    seed, nums, target = config.problems.seed, problem.nums, problem.target
    rng = random.Random(f"apr:{seed}:{problem.id}")
    params = config.apr.draw(rng)
    apr = apr_search(nums, target, params, rng)
    budget = Budget(SUB_CALL_BUDGET, apr.children) if config.apr.budget_prefix else None
    threads = apr_threads(apr, budget)
    texts = [len(t.prompt) + len(t.text) for t in threads]
    apr_record = {
        "id": problem.id, "nums": list(nums), "target": target, "solved": apr.solved,
        "search_path": final_text(threads),
        "solution": [op.text for op in apr.goal.operations] if apr.goal else None,
        "children": apr.children, "spawns": len(apr.spawns),
        "beam_size": params.beam_size, "sub_beam_size": params.sub_beam_size,
        "heuristic": params.heuristic, "promising_threshold": params.promising_threshold,
        "threads": [t.to_json() for t in threads],
    }
    rng = random.Random(f"sos:{seed}:{problem.id}")
    params = config.sos.draw(rng)
    sos = sos_search(nums, target, params, rng)
    (thread,) = sos_threads(sos)
    sos_tokens = tokenizer.sequence_length(thread.prompt, thread.text)
    if config.sos.budget_prefix:
        budget = Budget(TOKEN_BUDGET, token_budget(sos_tokens))
        (thread,) = sos_threads(sos, budget)
    sos_record = {
        "id": problem.id, "nums": list(nums), "target": target, "solved": sos.solved,
        "search_path": thread.prompt + thread.text,
        "solution": [op.text for op in sos.goal.operations] if sos.goal else None,
        "beam_size": params.beam_size, "heuristic": params.heuristic,
        "promising_threshold": params.promising_threshold, "tokens": sos_tokens,
        "threads": [thread.to_json()],
    }
    metrics = {
        "apr_solved": int(apr.solved), "apr_children": apr.children,
        "apr_chars_path": len(apr_record["search_path"]), "apr_chars_longest": max(texts),
        "apr_chars_total": sum(len(t.text) for t in threads),
        "sos_solved": int(sos.solved), "sos_chars": len(sos_record["search_path"]),
    }
    if measure_tokens:
        lengths = [tokenizer.sequence_length(t.prompt, t.text) for t in threads]
        metrics.update(apr_tokens_longest=max(lengths),
                       apr_tokens_total=sum(tokenizer.count_tokens(t.text) for t in threads),
                       sos_tokens=sos_tokens)
    return apr_record, sos_record, metrics


def _solve_chunk(args: tuple[list[Problem], DatagenConfig, int]) -> ChunkResult:
    problems, config, stride = args
    apr_records, sos_records = [], []
    metrics: dict[str, list[int]] = {k: [] for k in METRICS}
    for problem in problems:
        index = int(problem.id[1:])
        apr_record, sos_record, values = solve(problem, config, index % stride == 0)
        apr_records.append(apr_record)
        sos_records.append(sos_record)
        for key, value in values.items():
            metrics[key].append(value)
    return ChunkResult(_encode(apr_records, config.compression),
                       _encode(sos_records, config.compression), metrics)


# --- the stage ------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="problem", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


def generate_problems(config: DatagenConfig, pool, progress: bool
                      ) -> tuple[dict[str, list[Problem]], int]:
    """The deduplicated stream cut into splits; returns the splits and the candidates drawn."""
    cfg = config.problems
    sizes = cfg.sizes()
    wanted = sum(sizes.values())
    unique: list[Problem] = []
    seen: set[tuple[tuple[int, ...], int]] = set()  # (sorted numbers, target): the dedup key
    drawn = 0
    bar = _progress(wanted, "problems", progress)
    while len(unique) < wanted:
        need = wanted - len(unique)
        chunks = ((cfg.space(), cfg.seed, s, min(s + config.chunk_size, drawn + need))
                  for s in range(drawn, drawn + need, config.chunk_size))
        for chunk in pool.imap(_problem_chunk, chunks):
            for problem in chunk:
                if problem.key not in seen:
                    seen.add(problem.key)
                    unique.append(problem)
                    bar.update(1)
        drawn += need
        if len(unique) < wanted and drawn >= max(10 * wanted, 10_000):
            raise InputError(f"{drawn} draws gave only {len(unique)} distinct problems of the "
                             f"{wanted} asked for: widen the ranges or ask for fewer")
    bar.close()
    splits, start = {}, 0
    for split in SPLITS:
        splits[split] = unique[start:start + sizes[split]]
        start += sizes[split]
    return splits, drawn


def _chunks(problems: list[Problem], config: DatagenConfig) -> Iterator[list[Problem]]:
    for start in range(0, len(problems), config.chunk_size):
        yield problems[start:start + config.chunk_size]


def _token_stride(config: DatagenConfig) -> int:
    """Token lengths are measured on every stride-th problem of the stream (about
    `token_stats_sample` in all): exact counting costs about a third of a search."""
    if config.token_stats_sample == 0:
        return 1 << 62
    total = sum(config.problems.sizes().values())
    return max(1, -(-total // config.token_stats_sample))


def write_traces(split: str, problems: list[Problem], config: DatagenConfig, out: Path, pool,
                 progress: bool, part: Part = WHOLE, first_file: int = 0
                 ) -> dict[int, dict[str, list[int]]]:
    """Solve a split on the pool, streaming each chunk into its trace file as it arrives in
    order; only the files `part` owns, counting this split's first file as file `first_file`
    of the dataset (so the parts share out the splits' files evenly). Returns the stats'
    numbers by the split's file number."""
    suffix = ".jsonl.gz" if config.compression == "gzip" else ".jsonl"
    stride = _token_stride(config)
    per_file = config.shard_size // config.chunk_size
    owned = [(n // per_file, chunk) for n, chunk in enumerate(_chunks(problems, config))
             if part.owns(first_file + n // per_file)]
    metrics: dict[int, dict[str, array.array]] = {}
    files: dict[str, object] = {}
    bar = _progress(sum(len(chunk) for _, chunk in owned), f"traces:{split}", progress)
    work = ((chunk, config, stride) for _, chunk in owned)
    try:
        for (file_index, _), result in zip(owned, pool.imap(_solve_chunk, work)):
            if file_index not in metrics:
                for f in files.values():
                    f.close()
                name = f"{split}-{file_index:05d}{suffix}"
                files = {kind: open(out / "traces" / kind / name, "wb") for kind in ("apr", "sos")}
                metrics[file_index] = {k: array.array("q") for k in METRICS}
            files["apr"].write(result.apr)
            files["sos"].write(result.sos)
            for key, values in result.metrics.items():
                metrics[file_index][key].extend(values)
            bar.update(len(result.metrics["apr_solved"]))
    finally:
        for f in files.values():
            f.close()
        bar.close()
    return {i: {k: list(v) for k, v in m.items()} for i, m in metrics.items()}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")


def run(config: DatagenConfig, out: str | Path, progress: bool = True,
        part: Part | None = None, problems: str | Path | None = None) -> dict:
    """Write the whole dataset (or one `part` of it, for `datagen_merge`; a part of one is a
    part too) to `out`; returns the stats. `problems`: a problem set from `draw` to solve
    instead of drawing them. Refuses to overwrite `out`."""
    out = _fresh(out, config)
    with atomic.partial_dir(out) as partial:  # the dataset appears complete, or not at all
        stats = _write_dataset(config, partial, progress, part, problems)
    return stats


def draw(config: DatagenConfig, out: str | Path, progress: bool = True) -> dict:
    """Only the problems, for the parts of a dataset to share: the draw is deduplicated in
    the stream's order, so it cannot be split, and every part would repeat it (about 0.5 ms
    of one core per problem in the paper's space). Returns what problems.json records."""
    out = _fresh(out, config)
    started = time.perf_counter()
    with atomic.partial_dir(out) as partial, _pool(config) as pool:
        splits, drawn = generate_problems(config, pool, progress)
        (partial / "problems").mkdir()
        for split, split_problems in splits.items():
            _write_jsonl(partial / "problems" / f"{split}.jsonl",
                         [p.to_json() for p in split_problems])
        record = {"version": __version__, "problems": to_dict(config.problems),
                  "drawn": drawn, "kept": sum(len(p) for p in splits.values()),
                  "seconds": round(time.perf_counter() - started, 2)}
        (partial / PROBLEM_SET_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_problem_set(path: str | Path, config: DatagenConfig
                     ) -> tuple[dict[str, list[Problem]], int, float]:
    """The splits of a problem set written by `draw`, how many candidates it drew and in how
    many seconds; InputError unless it holds exactly the problems `config` asks for."""
    path = Path(path)
    drawn_with, drawn, seconds, version = read_marker(
        path, PROBLEM_SET_FILE, lambda record: (dict(record["problems"]), int(record["drawn"]),
                                                float(record["seconds"]), str(record["version"])),
        f"is not a problem set (no {PROBLEM_SET_FILE}): write one with `apr datagen "
        "--problems-only`", "is not a problem set's description: draw the problems again")
    if version != __version__:  # the draw itself may differ between releases
        raise InputError(f"{path} was drawn by apr {version}, this is apr {__version__}: draw "
                         "the problems again")
    wanted = to_dict(config.problems)
    differ = [f"problems.{k} is {drawn_with.get(k, 'not set')!r} there, "
              f"{wanted.get(k, 'not set')!r} here"
              for k in sorted(wanted.keys() | drawn_with.keys())
              if drawn_with.get(k, 'not set') != wanted.get(k, 'not set')]
    if differ:
        raise InputError(f"{path} holds other problems than the config asks for "
                         f"({'; '.join(differ)}): draw them with the same settings")
    splits = {}
    for split, size in config.problems.sizes().items():
        file = path / "problems" / f"{split}.jsonl"
        try:
            with open(file) as f:
                splits[split] = [Problem.from_json(json.loads(line)) for line in f]
        except OSError:
            raise InputError(f"{file} cannot be read: draw the problems again") from None
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{file} holds a line that is not a problem: draw the problems "
                             "again") from None
        if len(splits[split]) != size:
            raise InputError(f"{file} holds {len(splits[split])} problems, not the {size} its "
                             "problems.json says: draw the problems again")
    return splits, drawn, seconds


def _fresh(out: str | Path, config: DatagenConfig) -> Path:
    """`out`, once it is known not to exist and the problems to fit in memory."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: remove it or choose another --out")
    total = sum(config.problems.sizes().values())
    check_fits("problems.train_size", config.problems.train_size, total * PROBLEM_BYTES,
               "ask for fewer problems, or run on a machine with more memory")
    return out


def _workers(config: DatagenConfig) -> int:
    return config.workers or os.cpu_count() or 1


def _pool(config: DatagenConfig):
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    return ctx.Pool(_workers(config))


def _write_dataset(config: DatagenConfig, partial: Path, progress: bool, part: Part | None,
                   problem_set: str | Path | None) -> dict:
    for d in ("problems", "traces/apr", "traces/sos"):
        (partial / d).mkdir(parents=True)
    started = time.perf_counter()
    with _pool(config) as pool:
        drawing = 0.0  # the seconds of a draw done before, on the plan's machine: counted
        if problem_set is None:
            splits, drawn = generate_problems(config, pool, progress)
        else:
            splits, drawn, drawing = read_problem_set(problem_set, config)
        for split, problems in splits.items():
            _write_jsonl(partial / "problems" / f"{split}.jsonl", [p.to_json() for p in problems])
        problems_seconds = drawing + time.perf_counter() - started
        metrics, first_file = {}, 0
        for split, problems in splits.items():
            metrics[split] = write_traces(split, problems, config, partial, pool, progress,
                                          part if part is not None else WHOLE, first_file)
            first_file += math.ceil(len(problems) / config.shard_size)
    tokenizer.save(partial / "tokenizer")
    seconds = drawing + time.perf_counter() - started
    total = sum(len(p) for p in splits.values())
    stats = {
        "problems": {"drawn": drawn, "kept": total, "duplicates_dropped": drawn - total},
        "workers": _workers(config),
        "seconds": {"problems": round(problems_seconds, 2), "total": round(seconds, 2)},
    }
    (partial / "config.yaml").write_text(dump(config, SECTION))
    if part is not None:  # the numbers, not the stats: only the merge sees every file
        (partial / "metrics").mkdir()
        for split, by_file in metrics.items():
            (partial / "metrics" / f"{split}.json").write_text(
                json.dumps({str(i): m for i, m in by_file.items()}, separators=(",", ":")))
        (partial / PART_FILE).write_text(
            json.dumps({"index": part.index, "count": part.count, **stats}, indent=2) + "\n")
        return stats
    stats = {"splits": {split: summarize(concatenate(by_file)) for split, by_file in metrics.items()},
             **stats, "problems_per_second": round(total / seconds, 1) if seconds else None}
    (partial / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats

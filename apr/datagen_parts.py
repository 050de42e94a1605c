"""A dataset written in parts: which part writes which trace file, the files that mark a part
and a problem set, and the numbers behind stats.json, which the merge joins across parts.

The datagen stage writes whole datasets and parts (apr/stages/datagen.py); its merge joins
parts (apr/stages/datagen_merge.py). Both share what is here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from apr.config import InputError
from apr.summary import describe

T = TypeVar("T")

PART_FILE = "part.json"  # marks one part of a dataset written over several machines


@dataclass(frozen=True)
class Part:
    """Part `index` of `count`: it writes the trace files whose number (counted through the
    splits, val then test then train) is `index` modulo `count`. Problems are seeded by id,
    so the parts never need to talk to each other."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Part":
        """`I/N`, 0 <= I < N, as `--part` takes it."""
        index, _, count = text.partition("/")
        if not (index.strip().isdigit() and count.strip().isdigit()):
            raise InputError(f"--part {text!r}: expected I/N, the part's index I (from 0) and "
                             f"the number of parts N, e.g. 0/4")
        part = cls(int(index), int(count))
        if not 0 <= part.index < part.count:
            raise InputError(f"--part {text!r}: the index must be from 0 to {part.count - 1}")
        return part

    def owns(self, file_index: int) -> bool:
        return file_index % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Part()


def read_marker(directory: Path, name: str, parse: Callable[[dict], T], missing: str,
                bad: str) -> T:
    """The JSON file `name` that marks what `directory` is (a part, a problem set), through
    `parse`; one-line InputErrors, `directory` + `missing` when the file is not there and the
    file + `bad` when it does not parse."""
    marker = directory / name
    if not marker.is_file():
        raise InputError(f"{directory} {missing}")
    try:
        return parse(json.loads(marker.read_text()))
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{marker} {bad}") from None


METRICS = ("apr_solved", "apr_children", "apr_chars_path", "apr_chars_longest", "apr_chars_total",
           "sos_solved", "sos_chars", "apr_tokens_longest", "apr_tokens_total", "sos_tokens")


def concatenate(by_file: dict[int, dict[str, list[int]]]) -> dict[str, list[int]]:
    """The numbers of a split's files, in file order: what one machine would have measured."""
    joined: dict[str, list[int]] = {k: [] for k in METRICS}
    for index in sorted(by_file):
        for key in METRICS:
            joined[key].extend(by_file[index][key])
    return joined


def summarize(metrics: dict[str, list[int]]) -> dict:
    n = len(metrics["apr_solved"])
    if n == 0:
        return {"problems": 0}
    return {
        "problems": n,
        "apr": {
            "solve_rate": round(sum(metrics["apr_solved"]) / n, 4),
            "children_per_problem": round(sum(metrics["apr_children"]) / n, 3),
            "chars": {"search_path": describe(metrics["apr_chars_path"]),
                      "longest_thread": describe(metrics["apr_chars_longest"]),
                      "all_threads_written": describe(metrics["apr_chars_total"])},
            "tokens": {"sampled_problems": len(metrics["apr_tokens_longest"]),
                       "longest_thread": describe(metrics["apr_tokens_longest"]),
                       "all_threads_written": describe(metrics["apr_tokens_total"])},
        },
        "sos": {
            "solve_rate": round(sum(metrics["sos_solved"]) / n, 4),
            "chars": {"search_path": describe(metrics["sos_chars"])},
            "tokens": {"sampled_problems": len(metrics["sos_tokens"]),
                       "sequence": describe(metrics["sos_tokens"])},
        },
    }

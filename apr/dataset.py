"""An `apr datagen` output on disk: its layout and the readers every later stage uses.

    problems/{train,val,test}.jsonl        one problem a line: id, nums, target, solution
    traces/{apr,sos}/{split}-NNNNN.jsonl[.gz]   one solver record a line, threads included
    tokenizer/                              the domain tokenizer the data was made with
"""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from pathlib import Path
from typing import Iterator

from apr import tokenizer as domain_tokenizer
from apr.config import InputError
from apr.datagen_parts import PART_FILE


class DataError(InputError):
    """Data that cannot be used; the message says what to fix."""


def problems_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / "problems" / f"{split}.jsonl"


def load_problems(problems: str | Path, split: str, limit: int) -> list[dict]:
    """The first `limit` problems of `split` of a datagen output, or of a problems JSONL."""
    path = Path(problems)
    if path.is_dir():
        path = problems_path(path, split)
    if not path.is_file():
        raise DataError(f"no problems at {path}: pass an `apr datagen` output or a problems JSONL")
    rows = [_problem(row, where) for where, row in itertools.islice(json_lines(path), limit)]
    if not rows:
        raise DataError(f"{path} holds no problems")
    return rows


def json_lines(path: Path) -> Iterator[tuple[str, object]]:
    """(where, value) for each non-blank line of a plain or gzip JSONL file; a truncated or
    corrupt file is a DataError naming the line, never a traceback."""
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rt") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {number}: not JSON ({e.msg}): is the file "
                                    "truncated? regenerate it") from None
                yield f"{path}, line {number}", value
    except (EOFError, gzip.BadGzipFile, UnicodeDecodeError, zlib.error) as e:
        raise DataError(f"{path}: unreadable after line {number} ({e}): is the file "
                        "truncated? regenerate it") from None


def _problem(row: object, where: str) -> dict:
    """One problem, checked: `nums` a list of 2 or more positive integers, `target` a positive
    integer (a string of numbers or a null target is an error, never scored)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with nums and target")
    nums, target = row.get("nums"), row.get("target")
    if not (isinstance(nums, list) and len(nums) >= 2 and all(_positive_int(n) for n in nums)):
        raise DataError(f"{where}: nums must be a list of 2 or more positive integers, "
                        f"not {nums!r:.60}")
    if not _positive_int(target):
        raise DataError(f"{where}: target must be a positive integer, not {target!r:.60}")
    return row


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def shard_paths(data_dir: str | Path, kind: str, split: str) -> list[Path]:
    if (Path(data_dir) / PART_FILE).exists():
        raise DataError(f"{data_dir} is one part of a dataset written by `apr datagen --part`: "
                        "join the parts with `apr datagen-merge` and use its output")
    directory = Path(data_dir) / "traces" / kind
    paths = sorted(directory.glob(f"{split}-*.jsonl")) + sorted(directory.glob(f"{split}-*.jsonl.gz"))
    return sorted(paths)


def read_records(data_dir: str | Path, kind: str, split: str) -> Iterator[dict]:
    """Trace records of one split, shard by shard (plain or gzip JSONL)."""
    paths = shard_paths(data_dir, kind, split)
    if not paths:
        raise DataError(f"no {kind} trace shards for split {split!r} under "
                        f"{Path(data_dir) / 'traces' / kind}: is this an `apr datagen` output?")
    for path in paths:
        for where, record in json_lines(path):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a trace record (an object)")
            yield record


def check_tokenizer(data_dir: str | Path) -> None:
    """The data's tokenizer must be the one the model is built with (same vocabulary)."""
    path = Path(data_dir) / "tokenizer"
    saved = domain_tokenizer.load(path).get_vocab(with_added_tokens=True)
    current = domain_tokenizer.build().get_vocab(with_added_tokens=True)
    if saved != current:
        raise DataError(f"the tokenizer in {path} does not match this version's domain "
                        "tokenizer: regenerate the data with `apr datagen`")

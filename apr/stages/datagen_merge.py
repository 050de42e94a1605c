"""Join the parts of a dataset written over several machines into the one dataset.

    apr datagen --config paper --part 0/4 --out parts/0     (and 1/4, 2/4, 3/4 elsewhere)
    apr datagen-merge parts/0 parts/1 parts/2 parts/3 --out data

Every part holds the same problems, tokenizer and config, and the trace files it owns
(`datagen.Part`); the merge checks that the parts belong together and cover every file once,
copies them, and computes stats.json from the parts' numbers, so the result equals, file for
file, what `apr datagen` writes on one machine. The parts are read, never changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

from apr import atomic
from apr.config import InputError
from apr.countdown.problems import SPLITS
from apr.datagen_parts import PART_FILE, concatenate, read_marker, summarize

SHARED = ("config.yaml", "problems", "tokenizer")  # identical in every part


def _digest(path: Path) -> str:
    """One hash of a file or of a directory's files and their names."""
    h = hashlib.sha256()
    for f in sorted([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _parse_part(part: dict) -> dict:
    described = {**part, "index": int(part["index"]), "count": int(part["count"])}
    for key, fields in (("seconds", ("total", "problems")), ("problems", ("kept",))):
        for field in fields:  # the numbers the merged stats.json is made of
            float(described[key][field])
    int(described["workers"])
    return described


def _read_part(path: Path) -> dict:
    return read_marker(path, PART_FILE, _parse_part,
                       f"is not a part of a dataset (no {PART_FILE}): pass the outputs of "
                       "`apr datagen --part I/N`", "is not a part description: regenerate "
                       "that part")


def _expected_files(path: Path) -> dict[str, int]:
    """Trace files per split in the whole dataset, from the parts' shared config."""
    import yaml

    config = yaml.safe_load((path / "config.yaml").read_text())["datagen"]
    sizes = {s: config["problems"][f"{s}_size"] for s in SPLITS}
    return {s: math.ceil(n / config["shard_size"]) for s, n in sizes.items()}


def _check_trace_files(traces: Path, expected: dict[str, int]) -> None:
    """Every trace file the config implies is there, for both trace styles (a part whose
    numbers are whole may still have lost a file)."""
    for kind in ("apr", "sos"):
        present = {f.name.split(".")[0] for f in (traces / kind).iterdir()}
        for split, files in expected.items():
            lost = [f"{split}-{i:05d}" for i in range(files) if f"{split}-{i:05d}" not in present]
            if lost:
                raise InputError(f"the parts lack the {kind} trace file {lost[0]}"
                                 f"{f' and {len(lost) - 1} more' if len(lost) > 1 else ''}: "
                                 "a part is incomplete, regenerate it")


def merge(parts: list[str | Path], out: str | Path) -> dict:
    """Write the dataset the `parts` make up to `out` (which must not exist); returns the stats."""
    paths = [Path(p) for p in parts]
    if not paths:
        raise InputError("no parts given: pass the directories `apr datagen --part I/N` wrote")
    for path in paths:
        if not path.is_dir():
            raise InputError(f"{path} is not a directory: pass the outputs of `apr datagen --part`")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: remove it or choose another --out")
    described = [_read_part(p) for p in paths]
    count = described[0]["count"]
    if any(d["count"] != count for d in described):
        raise InputError("the parts come from runs with different part counts "
                         f"({sorted({d['count'] for d in described})}): pass the parts of one run")
    indices = sorted(d["index"] for d in described)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        raise InputError(f"{count} parts make this dataset, but " + (
            f"parts {repeated} are given twice" if repeated else f"parts {missing} are missing"))
    for name in SHARED:
        digests = {_digest(p / name) if (p / name).exists() else None for p in paths}
        if len(digests) != 1 or None in digests:
            raise InputError(f"the parts' {name} differ: every part must run the same config "
                             "(same preset, same --set) and the same version of apr")
    expected = _expected_files(paths[0])
    with atomic.partial_dir(out) as partial:
        for name in SHARED:
            source = paths[0] / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, partial / name)
        for kind in ("apr", "sos"):
            (partial / "traces" / kind).mkdir(parents=True)
        metrics: dict[str, dict[int, dict[str, list[int]]]] = {s: {} for s in SPLITS}
        for path, part in zip(paths, described):
            for split in SPLITS:
                numbers = path / "metrics" / f"{split}.json"
                if not numbers.is_file():
                    raise InputError(f"{numbers} is missing: part {part['index']} is "
                                     "incomplete, regenerate it")
                by_file = json.loads(numbers.read_text())
                metrics[split].update({int(i): m for i, m in by_file.items()})
            for kind in ("apr", "sos"):
                for f in sorted((path / "traces" / kind).iterdir()):
                    shutil.copy2(f, partial / "traces" / kind / f.name)
        for split, files in expected.items():
            if sorted(metrics[split]) != list(range(files)):
                raise InputError(f"the parts hold {len(metrics[split])} of the {files} {split} "
                                 "trace files: a part is incomplete, regenerate it")
        _check_trace_files(partial / "traces", expected)
        seconds = max(d["seconds"]["total"] for d in described)
        kept = described[0]["problems"]["kept"]
        stats = {
            "splits": {s: summarize(concatenate(metrics[s])) for s in SPLITS},
            "problems": described[0]["problems"],
            "workers": sum(d["workers"] for d in described),
            "seconds": {"problems": max(d["seconds"]["problems"] for d in described),
                        "total": seconds},
            "problems_per_second": round(kept / seconds, 1) if seconds else None,
            "parts": count,
        }
        (partial / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats

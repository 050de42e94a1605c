"""The datagen stage end to end on a tiny config: layout, splits, records, determinism across
worker counts, compression, and complete-or-absent output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

from apr.config import load
from apr.countdown.problems import ProblemSpace, candidate
from apr.countdown.trace import verify, verify_text
from apr.stages import datagen
from apr.stages.datagen import DatagenConfig
from apr.tokenizer import TOKENIZER_FILES

SIZES = {"val": 20, "test": 20, "train": 60}
SHARD, CHUNK = 20, 10


def config(workers: int, compression: str = "none", *extra: str) -> DatagenConfig:
    return load(DatagenConfig, None, datagen.SECTION, [
        f"problems.train_size={SIZES['train']}", f"problems.val_size={SIZES['val']}",
        f"problems.test_size={SIZES['test']}", "problems.seed=5", f"shard_size={SHARD}",
        f"chunk_size={CHUNK}", f"workers={workers}", f"compression={compression}", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One dataset per (workers, compression), each written once for the module."""
    root = tmp_path_factory.mktemp("datagen")
    out = {}
    for workers, compression in [(2, "none"), (1, "none"), (2, "gzip"), (1, "gzip")]:
        path = root / f"w{workers}-{compression}"
        stats = datagen.run(config(workers, compression), path, progress=False)
        out[workers, compression] = (path, stats)
    return out


@pytest.fixture(scope="module")
def data(runs):
    return runs[2, "none"]


def read_jsonl(path: Path) -> list[dict]:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def shards(out: Path, kind: str, split: str) -> list[Path]:
    return sorted((out / "traces" / kind).glob(f"{split}-*"))


def records(out: Path, kind: str, split: str) -> list[dict]:
    return [r for s in shards(out, kind, split) for r in read_jsonl(s)]


def test_layout(data):
    out, _ = data
    assert not out.with_name(out.name + ".partial").exists()
    for split, size in SIZES.items():
        problems = read_jsonl(out / "problems" / f"{split}.jsonl")
        assert len(problems) == size
        for kind in ("apr", "sos"):
            names = [s.name for s in shards(out, kind, split)]
            assert names == [f"{split}-{i:05d}.jsonl" for i in range(-(-size // SHARD))]
            counts = [len(read_jsonl(s)) for s in shards(out, kind, split)]
            assert all(c == SHARD for c in counts[:-1]) and sum(counts) == size
            # every problem id exactly once, in the problems file's order
            assert [r["id"] for r in records(out, kind, split)] == [p["id"] for p in problems]
    for name in TOKENIZER_FILES:
        assert (out / "tokenizer" / name).is_file()
    assert (out / "stats.json").is_file()
    saved = load(DatagenConfig, out / "config.yaml", datagen.SECTION)
    assert saved == config(2)
    assert {p.name for p in out.iterdir()} == {"problems", "traces", "tokenizer", "stats.json",
                                              "config.yaml"}


def test_splits_are_disjoint_and_problems_are_the_stream(data):
    out, stats = data
    keys, ids = set(), set()
    space = ProblemSpace()
    for split in SIZES:
        for p in read_jsonl(out / "problems" / f"{split}.jsonl"):
            key = (tuple(sorted(p["nums"])), p["target"])
            assert key not in keys and p["id"] not in ids
            keys.add(key)
            ids.add(p["id"])
            expected = candidate(space, 5, int(p["id"][1:]))
            assert p == expected.to_json()
            assert verify(expected.nums, expected.target, expected.solution).ok
    assert len(ids) == sum(SIZES.values())
    assert stats["problems"]["kept"] == sum(SIZES.values())
    assert stats["problems"]["drawn"] - stats["problems"]["duplicates_dropped"] == len(ids)


def test_apr_records(data):
    out, _ = data
    for split in SIZES:
        for r in records(out, "apr", split):
            assert {"id", "nums", "target", "solved", "search_path", "threads",
                    "children"} <= set(r)
            children = [t for t in r["threads"] if t["role"] == "child"]
            parents = [t for t in r["threads"] if t["role"] == "parent"]
            assert r["children"] == len(children)
            assert len(parents) == r["spawns"] + 1
            for t in r["threads"]:
                assert {"role", "prompt", "text"} <= set(t)
            assert parents[-1]["prompt"] + parents[-1]["text"] == r["search_path"]
            assert 1 <= r["beam_size"] <= 10 and r["beam_size"] <= r["sub_beam_size"] <= 15
            verdict = verify_text(r["nums"], r["target"], r["search_path"])
            assert verdict.ok == r["solved"], (r["id"], verdict)
            if r["solved"]:
                assert r["solution"]
            else:
                assert r["solution"] is None and r["search_path"].endswith("No solution found.\n")


def test_sos_records(data):
    out, _ = data
    for split in SIZES:
        for r in records(out, "sos", split):
            (thread,) = r["threads"]
            assert thread["prompt"] + thread["text"] == r["search_path"]
            assert thread["prompt"].startswith("Current State: ")
            assert verify_text(r["nums"], r["target"], r["search_path"]).ok == r["solved"]
            assert 1 <= r["beam_size"] <= 5 and r["tokens"] > 0


def test_stats_match_the_records(data):
    out, stats = data
    assert json.loads((out / "stats.json").read_text()) == stats
    for split, size in SIZES.items():
        s = stats["splits"][split]
        assert s["problems"] == size
        apr = records(out, "apr", split)
        sos = records(out, "sos", split)
        assert s["apr"]["solve_rate"] == round(sum(r["solved"] for r in apr) / size, 4)
        assert s["sos"]["solve_rate"] == round(sum(r["solved"] for r in sos) / size, 4)
        assert s["apr"]["children_per_problem"] == round(sum(r["children"] for r in apr) / size, 3)
        assert s["apr"]["tokens"]["sampled_problems"] == size  # 100 problems, sample 20,000
        assert s["sos"]["chars"]["search_path"]["max"] == max(len(r["search_path"]) for r in sos)


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_byte_identical_across_worker_counts(runs, compression):
    (a, stats_a), (b, stats_b) = runs[2, compression], runs[1, compression]
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys()
    differ = [name for name in fa if fa[name] != fb[name]]
    # stats.json has timings and the worker count; config.yaml records the worker count
    assert set(differ) <= {"config.yaml", "stats.json"}
    assert stats_a["splits"] == stats_b["splits"]
    assert stats_a["problems"] == stats_b["problems"]
    ca, cb = (yaml.safe_load(fa["config.yaml"]), yaml.safe_load(fb["config.yaml"]))
    assert (ca["datagen"].pop("workers"), cb["datagen"].pop("workers")) == (2, 1)
    assert ca == cb


def test_gzip_shards_hold_the_same_records(runs):
    plain, _ = runs[2, "none"]
    packed, _ = runs[2, "gzip"]
    for kind in ("apr", "sos"):
        gz = sorted((packed / "traces" / kind).iterdir())
        assert gz and all(p.name.endswith(".jsonl.gz") for p in gz)
        for p in gz:
            assert p.read_bytes()[:2] == b"\x1f\x8b"
            twin = plain / "traces" / kind / p.name.removesuffix(".gz")
            assert gzip.decompress(p.read_bytes()) == twin.read_bytes()


def test_refuses_an_existing_out(data):
    out, _ = data
    before = files(out)
    with pytest.raises(FileExistsError):
        datagen.run(config(1), out, progress=False)
    assert files(out) == before


@pytest.mark.slow
def test_a_failed_run_leaves_no_out(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(datagen.tokenizer, "save", broken)
    out = tmp_path / "data"
    with pytest.raises(RuntimeError, match="disk full"):
        datagen.run(config(1), out, progress=False)
    assert not out.exists()
    monkeypatch.undo()
    # the next run clears the leftover partial directory and completes
    datagen.run(config(1, "none", "problems.train_size=10"), out, progress=False)
    assert out.is_dir() and not (tmp_path / "data.partial").exists()
    assert len(read_jsonl(out / "problems" / "train.jsonl")) == 10


def test_budget_prefixes(tmp_path):
    out = tmp_path / "data"
    datagen.run(config(1, "none", "problems.train_size=10", "apr.budget_prefix=true",
                       "sos.budget_prefix=true"), out, progress=False)
    for r in records(out, "apr", "train"):
        for t in r["threads"]:
            assert t["prompt"].startswith(f"Sub Call Budget: {r['children']} ") == (
                t["role"] == "parent")
    for r in records(out, "sos", "train"):
        budget = -(-r["tokens"] // 512) * 512
        assert r["search_path"].startswith(f"Token Budget: {budget} Current State: ")
        assert verify_text(r["nums"], r["target"], r["search_path"]).ok == r["solved"]


def test_duplicates_are_dropped_before_the_splits_are_cut(tmp_path):
    # A tiny space (two numbers in 1..9, targets 2..12) repeats problems often.
    out = tmp_path / "data"
    stats = datagen.run(config(2, "none", "problems.n_numbers=2", "problems.num_max=9",
                               "problems.target_min=2", "problems.target_max=12",
                               "problems.train_size=30", "problems.val_size=10",
                               "problems.test_size=10"), out, progress=False)
    assert stats["problems"]["duplicates_dropped"] > 0
    assert stats["problems"]["drawn"] == 50 + stats["problems"]["duplicates_dropped"]
    keys = []
    previous = -1
    for split in ("val", "test", "train"):
        for p in read_jsonl(out / "problems" / f"{split}.jsonl"):
            keys.append((tuple(sorted(p["nums"])), p["target"]))
            index = int(p["id"][1:])
            assert index > previous  # the stream's order: val first, then test, then train
            previous = index
    assert len(keys) == len(set(keys)) == 50

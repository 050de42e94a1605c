"""A dataset written in parts (`apr datagen --part I/N`) and joined (`apr datagen-merge`) is
the dataset one machine writes: same files, byte for byte, and the same stats; parts that do
not belong together are refused with one line that says why."""

from __future__ import annotations

import json
import shutil

import pytest
from test_datagen import SIZES, config, files

from apr.config import InputError
from apr.dataset import DataError, read_records
from apr.stages import datagen
from apr.stages.datagen import Part
from apr.stages.datagen_merge import merge

PARTS = 3  # train has 3 trace files, val and test 1 each


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    whole = root / "whole"
    datagen.run(config(2), whole, progress=False)
    parts = [root / f"part-{i}" for i in range(PARTS)]
    for i, path in enumerate(parts):
        datagen.run(config(2), path, progress=False, part=Part(i, PARTS))
    return whole, parts


def test_each_part_holds_its_own_trace_files(written):
    _, parts = written
    # the dataset's files in order (val, test, train), dealt out to the parts in turn
    files = ["val-00000", "test-00000", "train-00000", "train-00001", "train-00002"]
    for i, path in enumerate(parts):
        names = sorted(p.name for p in (path / "traces" / "apr").iterdir())
        assert names == sorted(f"{name}.jsonl" for n, name in enumerate(files) if n % PARTS == i)
        assert json.loads((path / "part.json").read_text())["index"] == i
        assert not (path / "stats.json").exists()  # a part never looks like a dataset


def test_merged_parts_equal_the_whole(written, tmp_path):
    whole, parts = written
    stats = merge(list(reversed(parts)), tmp_path / "merged")  # any order
    a, b = files(whole), files(tmp_path / "merged")
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == ["stats.json"]  # timings differ
    expected = json.loads(a["stats.json"])
    assert stats["splits"] == expected["splits"]
    assert stats["problems"] == expected["problems"]
    assert stats["parts"] == PARTS
    assert json.loads(b["stats.json"]) == stats


def test_a_part_is_not_read_as_a_dataset(written):
    with pytest.raises(DataError, match="datagen-merge"):
        next(read_records(written[1][0], "apr", "train"))


@pytest.mark.parametrize("case, message", [
    ("missing", r"parts \[1\] are missing"),
    ("twice", r"parts \[0\] are given twice"),
    ("other config", "config.yaml differ"),
    ("other count", "different part counts"),
    ("lost file", "hold 2 of the 3 train trace files"),
    ("bare part file", "is not a part description"),
    ("deleted trace file", "lack the sos trace file train-00002"),
])
def test_parts_that_do_not_make_a_dataset_are_refused(written, tmp_path, case, message):
    _, parts = written
    given = list(parts)
    if case == "missing":
        given = [parts[0], parts[2]]
    elif case == "twice":
        given = [parts[0], parts[0], parts[2]]
    else:
        spoiled = tmp_path / "spoiled"
        shutil.copytree(parts[1], spoiled)
        given[1] = spoiled
        if case == "other config":
            text = (spoiled / "config.yaml").read_text()
            (spoiled / "config.yaml").write_text(text.replace("seed: 5", "seed: 6"))
        elif case == "other count":
            described = json.loads((spoiled / "part.json").read_text())
            (spoiled / "part.json").write_text(json.dumps({**described, "count": 4}))
        elif case == "bare part file":  # an index and a count, none of the part's numbers
            (spoiled / "part.json").write_text('{"index": 1, "count": 3}')
        elif case == "deleted trace file":  # its numbers kept
            (next((spoiled / "traces" / "sos").glob("train-00002.*"))).unlink()
        else:  # metrics of a file the part should hold, gone
            numbers = json.loads((spoiled / "metrics" / "train.json").read_text())
            (spoiled / "metrics" / "train.json").write_text(json.dumps({}))
            assert list(numbers) == ["2"]  # train-00002: file 4 of the dataset
    with pytest.raises(InputError, match=message):
        merge(given, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, expected", [("0/1", Part()), ("2/4", Part(2, 4))])
def test_part_parse(text, expected):
    assert Part.parse(text) == expected


def test_the_commands_write_parts_and_join_them(tmp_path, capsys):
    from apr import cli

    args = ["--no-progress", "--set", f"problems.train_size={SIZES['train']}",
            "--set", "problems.val_size=20", "--set", "problems.test_size=0",
            "--set", "shard_size=20", "--set", "chunk_size=10", "--set", "workers=1"]
    for i in range(2):
        assert cli.main(["datagen", *args, "--part", f"{i}/2", "--out", str(tmp_path / f"p{i}")]) == 0
    capsys.readouterr()
    assert cli.main(["datagen-merge", str(tmp_path / "p0"), str(tmp_path / "p1"),
                     "--out", str(tmp_path / "data")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["parts"] == 2 and stats["splits"]["train"]["problems"] == SIZES["train"]
    assert len(list((tmp_path / "data" / "traces" / "apr").glob("train-*.jsonl"))) == 3

"""A dataset written in parts (`apr datagen --part I/N`) and joined (`apr datagen-merge`) is
the dataset one machine writes: same files, byte for byte, and the same stats, whether each
part draws the problems or reads them from a problem set drawn once (`--problems-only`);
parts that do not belong together, and problem sets that do not fit, are refused with one
line that says why."""

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
def problem_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("set") / "problems"
    datagen.draw(config(2), path, progress=False)
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory, problem_set):
    """The whole dataset, and its parts: part 1 draws the problems itself, the others read
    them from the problem set, as the pipeline's parts do."""
    root = tmp_path_factory.mktemp("parts")
    whole = root / "whole"
    datagen.run(config(2), whole, progress=False)
    parts = [root / f"part-{i}" for i in range(PARTS)]
    for i, path in enumerate(parts):
        datagen.run(config(2), path, progress=False, part=Part(i, PARTS),
                    problems=None if i == 1 else problem_set)
    return whole, parts


def test_a_problem_set_holds_the_problems_the_dataset_draws(written, problem_set):
    whole, _ = written
    assert files(problem_set / "problems") == files(whole / "problems")
    described = json.loads((problem_set / "problems.json").read_text())
    drawn = json.loads((whole / "stats.json").read_text())["problems"]
    assert (described["drawn"], described["kept"]) == (drawn["drawn"], drawn["kept"])
    assert described["problems"]["seed"] == 5
    # a part that read them counts the plan's draw in its times, as if it had drawn them
    timed = json.loads((written[1][0] / "part.json").read_text())["seconds"]
    assert timed["total"] >= timed["problems"] >= described["seconds"] > 0


@pytest.mark.parametrize("case, message", [
    ("other seed", r"\(problems.seed is 5 there, 6 here\): draw them with the same settings"),
    ("not a set", "is not a problem set"),
    ("problem lost", "holds 59 problems, not the 60"),
    ("not a problem", "holds a line that is not a problem"),
    ("bad description", "is not a problem set's description"),
    ("split file gone", "val.jsonl cannot be read"),
    ("key unknown here", r"\(problems.colour is 'blue' there, 'not set' here\)"),
    ("other release", "was drawn by apr 0.0.1, this is apr"),
    ("bad id", "holds a line that is not a problem"),
])
def test_problem_sets_that_do_not_fit_are_refused(problem_set, tmp_path, case, message):
    spoiled = tmp_path / "set"
    shutil.copytree(problem_set, spoiled)
    train = spoiled / "problems" / "train.jsonl"
    asked = config(2, "none", "problems.seed=6") if case == "other seed" else config(2)
    if case == "not a set":
        (spoiled / "problems.json").unlink()
    elif case == "problem lost":
        train.write_text("".join(train.read_text().splitlines(keepends=True)[1:]))
    elif case == "not a problem":
        train.write_text(train.read_text().replace('"solution":["', '"solution":["x', 1))
    elif case == "bad description":
        (spoiled / "problems.json").write_text('{"drawn": 3}')
    elif case == "split file gone":
        (spoiled / "problems" / "val.jsonl").unlink()
    elif case in ("key unknown here", "other release"):
        described = json.loads((spoiled / "problems.json").read_text())
        if case == "other release":
            described["version"] = "0.0.1"
        else:
            described["problems"]["colour"] = "blue"
        (spoiled / "problems.json").write_text(json.dumps(described))
    elif case == "bad id":
        train.write_text(train.read_text().replace('"id":"p', '"id":"x', 1))
    with pytest.raises(InputError, match=message):
        datagen.run(asked, tmp_path / "out", progress=False, part=Part(0, 2), problems=spoiled)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


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
    assert cli.main(["datagen", *args, "--problems-only", "--out", str(tmp_path / "set")]) == 0
    for i in range(2):
        assert cli.main(["datagen", *args, "--part", f"{i}/2", "--problems", str(tmp_path / "set"),
                         "--out", str(tmp_path / f"p{i}")]) == 0
    capsys.readouterr()
    assert cli.main(["datagen-merge", str(tmp_path / "p0"), str(tmp_path / "p1"),
                     "--out", str(tmp_path / "data")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["parts"] == 2 and stats["splits"]["train"]["problems"] == SIZES["train"]
    assert len(list((tmp_path / "data" / "traces" / "apr").glob("train-*.jsonl"))) == 3


def test_problems_only_takes_no_part(tmp_path, capsys):
    from apr import cli

    assert cli.main(["datagen", "--problems-only", "--part", "0/2", "--out",
                     str(tmp_path / "set")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("apr datagen: error: --problems-only draws the problems alone: leave out "
                   "--part and --problems")
    assert not (tmp_path / "set").exists()

"""Write-then-rename: an output appears complete or not at all, and never eats another's."""

from __future__ import annotations

import pytest

from apr import atomic


def test_a_stale_partial_from_a_killed_run_is_cleared(tmp_path):
    out = tmp_path / "eval"
    stale = atomic.partial_path(out)
    stale.mkdir()
    (stale / "results.jsonl").write_text("half a line")
    with atomic.partial_dir(out) as partial:
        (partial / "metrics.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert not stale.exists()


def test_a_failed_write_leaves_neither_output_nor_partial(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(RuntimeError), atomic.partial_dir(out) as partial:
        (partial / "problems.jsonl").write_text("{}\n")
        raise RuntimeError("killed mid-write")
    assert not out.exists() and not atomic.partial_path(out).exists()


def test_replace_keeps_the_old_output_until_the_new_one_is_whole(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError), atomic.partial_dir(out, replace=True) as partial:
        (partial / "model.safetensors").write_text("new, half")
        raise RuntimeError("killed")
    assert (out / "model.safetensors").read_text() == "old"
    with atomic.partial_dir(out, replace=True) as partial:
        (partial / "model.safetensors").write_text("new")
    assert (out / "model.safetensors").read_text() == "new"
    assert not out.with_name("model.old").exists()


def test_without_replace_an_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("someone else's")
    with pytest.raises(FileExistsError, match="already exists"), \
            atomic.partial_dir(out) as partial:
        (partial / "stats.json").write_text("{}")
    assert (out / "keep.txt").read_text() == "someone else's"
    assert not atomic.partial_path(out).exists()


def test_write_text_replaces_a_file_whole(tmp_path):
    path = tmp_path / "sub" / "val.jsonl"
    atomic.write_text(path, "a\n")
    atomic.write_text(path, "b\n")
    assert path.read_text() == "b\n" and not atomic.partial_path(path).exists()


def test_replace_by_mark_replaces_only_an_earlier_output_of_the_same_writer(tmp_path):
    earlier, other = tmp_path / "eval", tmp_path / "docs"
    for directory, name in ((earlier, "metrics.json"), (other, "README.md")):
        directory.mkdir()
        (directory / name).write_text("x")
    with atomic.partial_dir(earlier, replace="metrics.json") as partial:
        (partial / "metrics.json").write_text("new")
    assert (earlier / "metrics.json").read_text() == "new"
    with pytest.raises(FileExistsError, match="holds no metrics.json"):
        atomic.check_replaceable(other, "metrics.json")
    with pytest.raises(FileExistsError), atomic.partial_dir(other, replace="metrics.json") as p:
        (p / "metrics.json").write_text("new")
    assert sorted(q.name for q in other.iterdir()) == ["README.md"]
